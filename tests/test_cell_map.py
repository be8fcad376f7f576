"""Cell map and gene–effect association (`superweights.cell_map`) on synthetic cells whose
per-cell effects follow one gene within each cell type and another gene only between types."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from superweights.cell_map import association, log_expression, map_cells, read_cells, write_outputs
from superweights.cell_map_plots import write_cell_map_figure
from superweights.errors import UserError

TYPES = ("Astro", "Micro", "Oligo")
GENES = ["DRIVER", "MARKER", *[f"G{i}" for i in range(30)]]
CID = "L1[5,7]"


def synthetic(n_per_type: int = 40, n_null: int = 49, seed: int = 0, flat: bool = False):
    """Tokenised counts and a cells.h5ad: the effect rises with DRIVER's counts inside every
    type; MARKER marks Micro, whose cells (and the null weights' cells) all depend more."""
    rng = np.random.default_rng(seed)
    n = n_per_type * len(TYPES)
    kind = np.repeat(TYPES, n_per_type)
    counts = rng.poisson(2.0, size=(n, len(GENES))).astype(np.float32)
    counts[:, 1] = np.where(kind == "Micro", rng.poisson(20, n), rng.poisson(0.5, n))
    offset = np.where(kind == "Micro", 1.0, 0.0)
    effect = offset + 0.3 * np.log1p(counts[:, 0]) + rng.normal(0, 0.05, n)
    nulls = offset[:, None] + rng.normal(0, 0.05, (n, n_null))
    ids = pd.Index([f"c{i}" for i in range(n)])
    tokenised = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"total_counts": counts.sum(1) + 500, "label": kind, "split": "test"}, index=ids
        ),
        var=pd.DataFrame(index=GENES),
        layers={"counts": sp.csr_matrix(counts)},
    )
    obs = pd.DataFrame({"cell_type": kind, "donor": rng.choice(["d1", "d2", "d3"], n)}, index=ids)
    obs["Overall AD neuropathological Change"] = rng.choice(["Low", "High"], n)
    obs[f"effect {CID}"] = 0.0 if flat else effect
    embedding = rng.normal(size=(n, 8)) + 3 * (kind == "Micro")[:, None]
    cells = ad.AnnData(obs=obs, obsm={"X_cls": embedding, f"null {CID}": nulls})
    cells.uns["candidates"] = [CID]
    return cells, tokenised


def test_within_type_association_finds_the_driver_not_the_marker():
    cells, tokenised = synthetic()
    table = association(cells, log_expression(tokenised, cells.obs_names), CID, min_cells=10)
    by_gene = table.set_index("gene")
    assert table.iloc[0]["gene"] == "DRIVER" and by_gene.loc["DRIVER", "rank"] == 1
    assert by_gene.loc["DRIVER", "z"] > 5 and by_gene.loc["DRIVER", "p_null"] == 1 / 50
    assert by_gene.loc["DRIVER", "n_types"] == 3 and by_gene.loc["DRIVER", "q_z"] < 1e-6
    assert (table["q_z"] >= table["p_z"]).all() and (table["q_z"] > 0.05).mean() > 0.9
    assert set(table["status"]) == {"exploratory"}
    # MARKER separates the types (and their effects), but within a type it says nothing
    assert abs(by_gene.loc["MARKER", "z"]) < 3
    others = table[table["gene"].str.startswith("G")]
    assert (others["z"].abs() < 4).mean() > 0.9


def test_a_pooled_correlation_would_have_ranked_the_marker():
    """The confound the within-type design removes is real in this data."""
    cells, tokenised = synthetic()
    expr = log_expression(tokenised, cells.obs_names)
    pooled = np.corrcoef(expr[:, "MARKER"].X.ravel(), cells.obs[f"effect {CID}"])[0, 1]
    assert pooled > 0.8


def test_map_cells_writes_a_umap_and_tables(tmp_path):
    cells, tokenised = synthetic(n_per_type=20)
    path = tmp_path / "ablate_cells.h5ad"
    cells.write_h5ad(path)
    cells = read_cells(path)
    cells.uns["confirmed"] = [CID]
    result = map_cells(cells, tokenised, min_cells=5)
    assert set(result.association["status"]) == {"confirmed"}
    assert result.cells.obsm["X_umap"].shape == (60, 2)
    assert result.summary["notes"] == [] and result.summary["n_genes_ranked"][CID] > 10
    written = write_outputs(result, tmp_path / "out")
    assert {p.name for p in written} == {"cells.h5ad", "association.tsv", "summary.json"}
    assert "X_umap" in ad.read_h5ad(tmp_path / "out" / "cells.h5ad").obsm
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
    cells, tokenised = synthetic(n_per_type=10, n_null=1)
    with pytest.raises(UserError, match="fewer than 2 null"):
        association(cells, log_expression(tokenised, cells.obs_names), CID, 3)
    noted = map_cells(cells, tokenised, min_cells=3)
    assert noted.association.empty and "fewer than 2 null" in noted.summary["notes"][0]
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

    cells, tokenised = synthetic(n_per_type=15)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    tokenised.write_h5ad(tmp_path / "tok.h5ad")
    args = ["cells", "--cells", str(tmp_path / "cells.h5ad"), "--data", str(tmp_path / "tok.h5ad")]
    assert main([*args, "--out", str(tmp_path / "out"), "--min-cells", "5"]) == 0
    table = pd.read_csv(tmp_path / "out" / "association.tsv", sep="\t")
    assert table.iloc[0]["gene"] == "DRIVER"
    assert (tmp_path / "out" / "umap.png").stat().st_size > 20_000
    bad = ["cells", "--cells", *args[4:], "--data", *args[4:], "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "not a cells.h5ad" in capsys.readouterr().err and not (tmp_path / "bad").exists()
