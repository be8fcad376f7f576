"""Cell map and donor-aware gene–effect association (`superweights.cell_map`) on synthetic
cells whose per-cell effects follow one gene within each donor and cell type, another gene
only between types, and a third only between donors."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

from superweights.cell_map import association, log_expression, map_cells, read_cells, write_outputs
from superweights.cell_map_plots import write_cell_map_figure
from superweights.errors import UserError
from superweights.outputs import cell_key

TYPES = ("Astro", "Micro", "Oligo")
DONORS = ("d1", "d2", "d3", "d4")
GENES = ["DRIVER", "MARKER", "DONORGENE", *[f"G{i}" for i in range(60)]]
CID = "L1[5,7]"
PERMUTATIONS = 1999  # with 63 genes, q can reach 63 / 2000 < 0.05


def synthetic(n_per_type: int = 48, seed: int = 0, flat: bool = False, driven: bool = True):
    """Tokenised counts and a cells.h5ad. The effect rises with DRIVER's counts inside every
    donor and type (unless not `driven`); MARKER marks Micro, whose cells all depend more;
    donor d1's cells depend more and express DONORGENE more (a donor confound)."""
    rng = np.random.default_rng(seed)
    n = n_per_type * len(TYPES)
    kind = np.repeat(TYPES, n_per_type)
    donor = np.resize(DONORS, n)
    counts = rng.poisson(2.0, size=(n, len(GENES))).astype(np.float32)
    counts[:, 1] = np.where(kind == "Micro", rng.poisson(20, n), rng.poisson(0.5, n))
    counts[:, 2] = np.where(donor == "d1", rng.poisson(20, n), rng.poisson(2, n))
    offset = np.where(kind == "Micro", 1.0, 0.0) + np.where(donor == "d1", 1.0, 0.0)
    effect = offset + rng.normal(0, 0.05, n)
    if driven:
        effect += 0.3 * np.log1p(counts[:, 0])
    ids = pd.Index([f"c{i}" for i in range(n)])
    tokenised = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"total_counts": counts.sum(1) + 500, "cell_type": kind, "split": "test"}, index=ids
        ),
        var=pd.DataFrame(index=GENES),
        layers={"counts": sp.csr_matrix(counts)},
    )
    obs = pd.DataFrame({"cell_type": kind, "donor": donor}, index=ids)
    obs["Overall AD neuropathological Change"] = rng.choice(["Low", "High"], n)
    obs["log_likelihood"] = rng.normal(-0.2, 0.05, n)
    obs[cell_key("effect", CID)] = 0.0 if flat else effect
    embedding = rng.normal(size=(n, 8)) + 3 * (kind == "Micro")[:, None]
    cells = ad.AnnData(obs=obs, obsm={"X_cls": embedding})
    cells.uns["candidates"] = [CID]
    return cells, tokenised


def associate(cells, tokenised, seed: int = 0) -> pd.DataFrame:
    expr = log_expression(tokenised, cells.obs_names)
    return association(cells, expr, CID, min_cells=10, n_permutations=PERMUTATIONS, seed=seed)


def test_within_donor_and_type_association_finds_the_driver_only():
    cells, tokenised = synthetic()
    table = associate(cells, tokenised)
    by_gene = table.set_index("gene")
    assert table.iloc[0]["gene"] == "DRIVER" and by_gene.loc["DRIVER", "rank"] == 1
    assert by_gene.loc["DRIVER", "p_null"] == 1 / (PERMUTATIONS + 1)
    assert by_gene.loc["DRIVER", "z"] > 5 and by_gene.loc["DRIVER", "q"] < 0.05
    assert by_gene.loc["DRIVER", "n_groups"] == 12 and by_gene.loc["DRIVER", "n_donors"] == 4
    assert (table["q"] >= table["p_null"]).all() and (table["q"] > 0.05).mean() > 0.9
    assert set(table["status"]) == {"exploratory"}
    # MARKER separates the types and DONORGENE the donors (and with them the effects), but
    # within a donor and type they say nothing.
    assert by_gene.loc["MARKER", "p_null"] > 0.01 and by_gene.loc["DONORGENE", "p_null"] > 0.01


def test_a_donor_confound_would_fool_a_within_type_correlation():
    """The confound the donor-aware design removes is real in this data: within each type,
    pooling donors, DONORGENE goes with the effect."""
    cells, tokenised = synthetic(driven=False)
    expr = log_expression(tokenised, cells.obs_names)
    for kind in TYPES:
        rows = (cells.obs["cell_type"] == kind).to_numpy()
        rho = spearmanr(expr[rows, "DONORGENE"].X.ravel(), cells.obs[cell_key("effect", CID)][rows])
        assert rho.statistic > 0.5 and rho.pvalue < 1e-4
    assert associate(cells, tokenised).set_index("gene").loc["DONORGENE", "p_null"] > 0.01


def test_p_values_are_calibrated_under_the_null():
    """No gene drives the effect (donor and type offsets only): over 6 data sets x 60 noise
    genes, P(p <= 0.1) should be 0.1. The count is then about Binomial(360, 0.1) (genes are
    independent here): mean 36, sd 5.7; we accept 19..53 (3 sd)."""
    hits = total = 0
    for seed in range(6):
        cells, tokenised = synthetic(seed=seed, driven=False)
        table = associate(cells, tokenised, seed=seed)
        noise = table[table["gene"].str.startswith("G")]
        hits += int((noise["p_null"] <= 0.1).sum())
        total += len(noise)
    assert total == 360 and 19 <= hits <= 53


def test_map_cells_writes_a_umap_and_tables(tmp_path):
    cells, tokenised = synthetic(n_per_type=24)
    path = tmp_path / "ablate_cells.h5ad"
    cells.write_h5ad(path)
    cells = read_cells(path)
    cells.uns["confirmed"] = [CID]
    result = map_cells(cells, tokenised, min_cells=5, n_permutations=PERMUTATIONS)
    assert set(result.association["status"]) == {"confirmed"}
    assert result.cells.obsm["X_umap"].shape == (72, 2)
    assert result.summary["notes"] == [] and result.summary["n_genes_ranked"][CID] > 10
    written = write_outputs(result, tmp_path / "out")
    assert {p.name for p in written} == {"cells.h5ad", "association.tsv", "summary.json"}
    back = ad.read_h5ad(tmp_path / "out" / "cells.h5ad")
    assert "X_umap" in back.obsm and "effect_L1_5_7" in back.obs  # valid identifiers
    # The evaluated cells' expression rides along: scanpy plots a gene on the cell map.
    import scanpy as sc

    assert list(back.var_names) == GENES and back.uns["log1p"] == {"base": None}
    ax = sc.pl.umap(back, color="DRIVER", show=False)
    assert ax.get_title() == "DRIVER"
    figure = write_cell_map_figure(result.cells, tmp_path / "umap.png")
    assert figure.stat().st_size > 20_000


def test_all_zero_effects_and_a_single_cell_type_give_notes_not_errors():
    cells, tokenised = synthetic(n_per_type=10, flat=True)
    one = cells[cells.obs["cell_type"] == "Astro"].copy()
    result = map_cells(one, tokenised, min_cells=3)
    notes = " ".join(result.summary["notes"])
    assert "1 cell type" in notes and "exactly 0" in notes
    assert result.association.empty and result.summary["all_zero_effects"] == [CID]


def test_bad_inputs(tmp_path):
    cells, tokenised = synthetic(n_per_type=4)  # 12 cells: groups of 1
    with pytest.raises(UserError, match="too few for a donor-aware association"):
        association(cells, log_expression(tokenised, cells.obs_names), CID, 3)
    with pytest.raises(UserError, match="not in the tokenised data"):
        log_expression(tokenised[:5], cells.obs_names)
    bad = tmp_path / "bad.h5ad"
    ad.AnnData(obs=pd.DataFrame(index=["a"])).write_h5ad(bad)
    with pytest.raises(UserError, match="not a cells.h5ad"):
        read_cells(bad)
    with pytest.raises(UserError, match="cannot read"):
        read_cells(tmp_path / "missing.h5ad")


def test_cells_cli(tmp_path, capsys):
    from superweights.cli import main

    cells, tokenised = synthetic(n_per_type=24)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    tokenised.write_h5ad(tmp_path / "tok.h5ad")
    args = ["cells", "--cells", str(tmp_path / "cells.h5ad"), "--data", str(tmp_path / "tok.h5ad")]
    options = ["--min-cells", "5", "--n-permutations", "99"]
    assert main([*args, "--out", str(tmp_path / "out"), *options]) == 0
    table = pd.read_csv(tmp_path / "out" / "association.tsv", sep="\t")
    assert table.iloc[0]["gene"] == "DRIVER"
    assert (tmp_path / "out" / "umap.png").stat().st_size > 20_000
    bad = ["cells", "--cells", *args[4:], "--data", *args[4:], "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "not a cells.h5ad" in capsys.readouterr().err and not (tmp_path / "bad").exists()
