"""Preprocessing: binning, QC, vocabulary, gene selection, donor split, chunking, bad input."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from superweights.data.preprocess import (
    PreprocessSettings,
    bin_row,
    preprocess,
    read_tokenised,
    split_donors,
)
from superweights.errors import UserError


def settings(**changes):
    base = dict(min_genes=10, n_hvg=50, min_cells_per_type=20, chunk_size=500)
    return PreprocessSettings(**(base | changes))


def test_bin_row_follows_scgpt_quantile_bins():
    rng = np.random.default_rng(0)
    values = np.round(rng.gamma(1.0, 2.0, 400), 1)  # many ties
    bins = bin_row(values, 51, np.random.default_rng(3))
    edges = np.quantile(values, np.linspace(0, 1, 50))
    assert bins.min() >= 1 and bins.max() <= 50
    low = np.maximum(np.digitize(values, edges, right=True), 1)
    high = np.digitize(values, edges)
    assert np.all((bins >= low) & (bins <= high))
    order = np.argsort(values)
    assert np.all(np.diff(bins[order]) >= -1)  # monotone up to random tie-breaks inside a tie
    assert bins[values.argmax()] == 50
    assert bins[values.argmin()] == 1


def test_preprocess_outputs(counts_h5ad, counts_adata):
    tok, qc = preprocess(counts_h5ad, settings())
    bins = tok.layers["X_binned"]
    assert bins.max() <= 50 and bins.min() >= 0
    # QC flag: every 50th cell is flagged unused and must be gone
    assert not any(int(c.removeprefix("cell")) % 50 == 0 for c in tok.obs_names)
    # counts layer is the input counts of the chosen cells and genes
    expected = counts_adata[tok.obs_names, tok.var_names].layers["UMIs"].toarray()
    np.testing.assert_array_equal(tok.layers["counts"].toarray(), expected)
    # a bin is present exactly where a count is
    np.testing.assert_array_equal(bins.toarray() > 0, expected > 0)
    # genes of interest kept whatever their variance; token ids from the vocabulary
    assert {"APP", "MAPT", "APOE"} <= set(tok.var_names)
    assert tok.var.loc[["APP", "MAPT", "APOE"], "gene_of_interest"].all()
    assert tok.var["highly_variable"].sum() == 50
    # donors never cross splits; every split has cells
    per_donor = tok.obs.groupby("donor", observed=True)["split"].nunique()
    assert (per_donor == 1).all()
    assert set(tok.obs["split"]) == {"train", "val", "test"}
    assert list(tok.obs["cell_type"].cat.categories) == ["type0", "type1", "type2", "type3"]
    kept = qc.set_index("step").loc["cell_types_and_caps", "count"]
    assert kept == tok.n_obs


def test_tokenised_data_of_earlier_versions_reads_label_as_cell_type(counts_h5ad, tmp_path):
    tok, _ = preprocess(counts_h5ad, settings())
    old = tok.copy()
    old.obs = old.obs.rename(columns={"cell_type": "label"})
    old.write_h5ad(tmp_path / "old.h5ad")
    read = read_tokenised(tmp_path / "old.h5ad")
    assert "label" not in read.obs
    pd.testing.assert_series_equal(read.obs["cell_type"], tok.obs["cell_type"])


def test_preprocess_is_chunk_size_invariant_and_seeded(counts_h5ad):
    a, _ = preprocess(counts_h5ad, settings(chunk_size=97))
    b, _ = preprocess(counts_h5ad, settings(chunk_size=5000))
    assert (a.layers["X_binned"] != b.layers["X_binned"]).nnz == 0
    c, _ = preprocess(counts_h5ad, settings(chunk_size=97, seed=5))
    assert (a.layers["X_binned"] != c.layers["X_binned"]).nnz > 0


def test_scanpy_conventions(counts_h5ad, counts_adata):
    """QC columns as calculate_qc_metrics names and computes them, seurat_v3 HVG as scanpy
    computes it on the chosen cells' counts, X = log1p(counts per 10k), bins in X_binned."""
    import scanpy as sc

    tok, _ = preprocess(counts_h5ad, settings())
    raw = ad.AnnData(counts_adata.layers["UMIs"].copy(), obs=counts_adata.obs[[]],
                     var=pd.DataFrame(index=counts_adata.var_names))  # fmt: skip
    raw.var["mt"] = raw.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(raw, qc_vars=["mt"], inplace=True, percent_top=None)
    for column in ("n_genes_by_counts", "total_counts", "pct_counts_mt"):
        np.testing.assert_allclose(tok.obs[column], raw.obs.loc[tok.obs_names, column], rtol=1e-6)
    chosen = raw[tok.obs_names[tok.obs["split"] == "train"]].copy()  # training donors only
    sc.pp.highly_variable_genes(chosen, flavor="seurat_v3", n_top_genes=50)
    expected = set(chosen.var_names[chosen.var["highly_variable"]])
    assert set(tok.var_names[tok.var["highly_variable"]]) == expected
    totals = raw.obs.loc[tok.obs_names, "total_counts"].to_numpy()
    logged = np.log1p(tok.layers["counts"].toarray() * (1e4 / totals)[:, None])
    np.testing.assert_allclose(tok.X.toarray(), logged, rtol=1e-5, atol=1e-6)
    dispersion, _ = preprocess(counts_h5ad, settings(hvg_flavor="seurat"))
    assert "dispersions_norm" in dispersion.var and "variances_norm" in tok.var
    with pytest.raises(UserError, match="hvg_flavor"):
        settings(hvg_flavor="cell_ranger")


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat"])
def test_genes_are_chosen_on_the_training_donors_only(tmp_path, counts_adata, flavor):
    """A gene that varies wildly in the held-out donors' cells only is not chosen: the
    validation and test cells must not shape the features they are evaluated on."""
    first, _ = preprocess_adata(tmp_path / "a.h5ad", counts_adata, flavor)
    held_out = first.obs_names[first.obs["split"] != "train"]
    quiet = sorted(set(counts_adata.var_names) - set(first.var_names[first.var["highly_variable"]])
                   - {"APP", "MAPT", "TREM2", "APOE", "PSEN1", "PSEN2"})[:3]  # fmt: skip
    spiked = counts_adata.copy()
    umis = spiked.layers["UMIs"].tolil()
    rng = np.random.default_rng(0)
    for gene in quiet:
        column = spiked.var_names.get_loc(gene)
        for cell in held_out:
            umis[spiked.obs_names.get_loc(cell), column] = float(rng.choice([0, 400]))
    spiked.layers["UMIs"] = umis.tocsr()
    second, _ = preprocess_adata(tmp_path / "b.h5ad", spiked, flavor)
    assert (second.obs["split"] == first.obs["split"]).all()
    chosen = set(second.var_names[second.var["highly_variable"]])
    assert chosen == set(first.var_names[first.var["highly_variable"]])
    assert not chosen & set(quiet)
    assert "training donors" in second.uns["preprocess"]["hvg_cells"]


def preprocess_adata(path, adata, flavor):
    adata.write_h5ad(path)
    return preprocess(path, settings(hvg_flavor=flavor))


def test_caps_and_rare_types(tmp_path, counts_adata, caplog):
    labels = counts_adata.obs["Subclass"].astype(str).to_numpy()
    labels[:10] = "rare"
    counts_adata.obs["Subclass"] = pd.Categorical(labels)
    path = tmp_path / "rare.h5ad"
    counts_adata.write_h5ad(path)
    tok, _ = preprocess(path, settings(max_cells_per_type=100))
    assert "rare" not in set(tok.obs["cell_type"])
    assert tok.obs["cell_type"].value_counts().max() == 100
    assert "rare" in caplog.text


def test_split_donors_disjoint_and_seeded():
    donors = [f"d{i}" for i in range(10)]
    split = split_donors(donors, 0.2, 0.2, seed=1)
    assert sorted(split) == donors
    assert list(split.values()).count("test") == 3  # at least 3 test donors
    assert list(split.values()).count("val") == 2
    assert split == split_donors(donors, 0.2, 0.2, seed=1)


def test_split_donors_is_stratified_by_stage():
    stages = {"Not AD": 7, "Low": 6, "Intermediate": 5, "High": 4, "Reference": 1}
    strata = {f"{s}-{i}": s for s, n in stages.items() for i in range(n)}
    split = split_donors(list(strata), 0.2, 0.2, seed=0, strata=strata)
    counts = pd.crosstab(pd.Series(strata), pd.Series(split))
    assert (counts.loc[["Not AD", "Low", "Intermediate"], "test"] == 3).all()
    assert (counts.loc[["Not AD", "Low", "Intermediate"], "train"] >= 1).all()
    assert counts.loc["High", "test"] == 1 and counts.loc["High", "val"] == 1  # 4 donors
    assert counts.loc["Reference"].sum() == 1
    assert set(split.values()) == {"train", "val", "test"}


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "superweights.cli", "preprocess", *map(str, args)],
        capture_output=True,
        text=True,
    )


def check_fails(result, out, needle):
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert needle in error_lines[0]
    assert not out.exists()
    assert not list(out.parent.glob("*tok*"))


def write(adata, path):
    adata.write_h5ad(path)
    return path


@pytest.fixture
def out(tmp_path):
    return tmp_path / "result" / "tok.h5ad"


def test_cli_works(counts_h5ad, out):
    result = run_cli(counts_h5ad, "--out", out, "--min-genes", 10)
    assert result.returncode == 0, result.stderr
    assert ad.read_h5ad(out).n_obs > 0
    assert out.with_suffix(".qc.png").stat().st_size > 0


def test_missing_file(tmp_path, out):
    check_fails(run_cli(tmp_path / "nope.h5ad", "--out", out), out, "not found")


def test_not_hdf5(tmp_path, out):
    path = tmp_path / "bad.h5ad"
    path.write_text("hello")
    check_fails(run_cli(path, "--out", out), out, "not an HDF5")


def test_truncated(tmp_path, counts_h5ad, out):
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(counts_h5ad.read_bytes()[: counts_h5ad.stat().st_size // 2])
    result = run_cli(path, "--out", out)
    check_fails(result, out, "")
    assert "truncated" in result.stderr or "cannot be read" in result.stderr


@pytest.mark.parametrize("column", ["Subclass", "Donor ID"])
def test_missing_column(tmp_path, counts_adata, out, column):
    del counts_adata.obs[column]
    path = write(counts_adata, tmp_path / "x.h5ad")
    check_fails(run_cli(path, "--out", out), out, f"'{column}' is not in obs")


def test_negative_counts(tmp_path, counts_adata, out):
    counts_adata.layers["UMIs"].data[0] = -3
    path = write(counts_adata, tmp_path / "x.h5ad")
    check_fails(run_cli(path, "--out", out, "--min-genes", 10), out, "negative")


def test_non_integer_counts(tmp_path, counts_adata, out):
    counts_adata.layers["UMIs"].data[5] = 0.5
    path = write(counts_adata, tmp_path / "x.h5ad")
    check_fails(run_cli(path, "--out", out, "--min-genes", 10), out, "non-integer")


def test_only_normalised_values(tmp_path, counts_adata, out):
    del counts_adata.layers["UMIs"]
    path = write(counts_adata, tmp_path / "x.h5ad")
    check_fails(run_cli(path, "--out", out), out, "no raw counts")


def write_vocab(folder, genes):
    """A checkpoint-style vocab.json: the genes, then <pad>, <cls>, <eoc>."""
    folder.mkdir()
    tokens = [*genes, "<pad>", "<cls>", "<eoc>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    return folder


def test_without_checkpoint_the_vocabulary_is_the_data_genes(tmp_path, counts_adata):
    names = [f"notagene{i}" for i in range(counts_adata.n_vars - 3)] + ["APP", "MAPT", "APOE"]
    counts_adata.var_names = names
    tok, _ = preprocess(write(counts_adata, tmp_path / "x.h5ad"), settings())
    assert tok.var["token_id"].tolist() == list(range(tok.n_vars))
    assert tok.var_names.str.startswith("notagene").sum() == tok.n_vars - 3
    assert tok.uns["preprocess"]["vocabulary"] == "genes of the data"


def test_pretraining_uses_the_preprocess_vocabulary(tmp_path, counts_h5ad):
    tok_path = tmp_path / "tok.h5ad"
    tok, _ = preprocess(counts_h5ad, settings(max_cells_per_type=40))
    tok.write_h5ad(tok_path)
    result = subprocess.run(
        [sys.executable, "-m", "superweights.cli", "pretrain", str(tok_path)]
        + ["--out-dir", str(tmp_path / "pre"), "--d-model", "16", "--nhead", "2"]
        + ["--d-hid", "16", "--nlayers", "1", "--epochs", "1", "--max-seq-len", "16"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    var = ad.read_h5ad(tok_path).var
    vocab = json.loads((tmp_path / "pre" / "checkpoint" / "vocab.json").read_text())
    assert {g: vocab[g] for g in var.index} == dict(zip(var.index, var["token_id"], strict=True))
    assert [vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [len(var), len(var) + 1, len(var) + 2]


def test_checkpoint_vocabulary_gives_token_ids_and_drops_unknown_genes(tmp_path, counts_h5ad):
    genes = list(ad.read_h5ad(counts_h5ad).var_names)
    known = ["PADDING0", *genes[:300:2], "APP", "MAPT"]  # ids shifted by one
    folder = write_vocab(tmp_path / "ckpt", known)
    tok, _ = preprocess(counts_h5ad, settings(), folder)
    assert set(tok.var_names) <= set(known) and {"APP", "MAPT"} <= set(tok.var_names)
    assert tok.var["token_id"].tolist() == [known.index(g) for g in tok.var_names]
    assert tok.uns["preprocess"]["vocab_match_rate"] == pytest.approx(152 / 304)


def test_overlap_just_above_the_minimum_passes_and_below_fails(tmp_path, counts_adata, out):
    genes = list(counts_adata.var_names)
    folder = write_vocab(tmp_path / "ckpt", genes[:183])  # 183 of 304 genes = 60.2%
    counts_adata.var_names = genes[:183] + [f"other{i}" for i in range(121)]
    path = write(counts_adata, tmp_path / "x.h5ad")
    passed = tmp_path / "passed" / "tok.h5ad"
    result = run_cli(path, "--out", passed, "--min-genes", 10, "--vocab", folder)
    assert result.returncode == 0, result.stderr
    assert ad.read_h5ad(passed).n_vars > 0
    result = run_cli(path, "--out", out, "--vocab", folder, "--min-vocab-match", 0.65)
    check_fails(result, out, "only 183 of 304 genes (60.2%) are in the vocabulary")
    assert result.returncode == 2 and "min_vocab_match is 65%" in result.stderr


def test_ensembl_ids_against_a_symbol_vocabulary(tmp_path, counts_adata, out):
    folder = write_vocab(tmp_path / "ckpt", list(counts_adata.var_names))
    counts_adata.var_names = [f"ENSG{i:011d}" for i in range(counts_adata.n_vars)]
    path = write(counts_adata, tmp_path / "x.h5ad")
    result = run_cli(path, "--out", out, "--vocab", folder)
    check_fails(result, out, "only 0 of 304 genes (0.0%)")
    assert result.returncode == 2
    assert "Ensembl IDs (e.g. ENSG00000000000)" in result.stderr
    assert "feature_name" in result.stderr


def test_other_unknown_names_get_a_symbol_hint(tmp_path, counts_adata, out):
    folder = write_vocab(tmp_path / "ckpt", list(counts_adata.var_names))
    counts_adata.var_names = [f"notagene{i}" for i in range(counts_adata.n_vars)]
    path = write(counts_adata, tmp_path / "x.h5ad")
    result = run_cli(path, "--out", out, "--vocab", folder)
    check_fails(result, out, "HGNC gene symbols")
    assert "notagene0, notagene1, notagene2" in result.stderr and "Ensembl" not in result.stderr


def test_symbols_in_feature_name_are_used_over_ensembl_ids(tmp_path, counts_adata):
    symbols = list(counts_adata.var_names)
    counts_adata.var["feature_name"] = symbols
    counts_adata.var_names = [f"ENSG{i:011d}.5" for i in range(counts_adata.n_vars)]
    path = write(counts_adata, tmp_path / "x.h5ad")
    for vocab in (None, write_vocab(tmp_path / "ckpt", symbols)):
        tok, _ = preprocess(path, settings(), vocab)
        assert set(tok.var_names) <= set(symbols) and "APP" in tok.var_names


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"APP": 0, "<cls>": 1, "<eoc>": 2}, "lacks the special token(s) <pad>"),
        ({"APP": 0, "<pad>": 1}, "lacks the special token(s) <cls>"),
        ({"APP": 0, "<pad>": 5, "<cls>": 1}, "must number its tokens 0..2"),
        (["APP", "<pad>", "<cls>"], "flat JSON object"),
    ],
)
def test_bad_vocabulary_file(tmp_path, counts_h5ad, out, content, needle):
    (tmp_path / "vocab.json").write_text(json.dumps(content))
    result = run_cli(counts_h5ad, "--out", out, "--vocab", tmp_path / "vocab.json")
    check_fails(result, out, needle)
    assert result.returncode == 2


def test_duplicated_genes(tmp_path, counts_adata, out):
    names = list(counts_adata.var_names)
    names[1] = names[0]
    counts_adata.var_names = names
    path = write(counts_adata, tmp_path / "x.h5ad")
    check_fails(run_cli(path, "--out", out), out, "duplicated gene names")


def test_all_cells_removed(counts_h5ad, out):
    check_fails(run_cli(counts_h5ad, "--out", out, "--min-genes", 100000), out, "removed by QC")


def test_dense_integer_x_is_used_as_counts(tmp_path, counts_adata):
    counts_adata.X = counts_adata.layers.pop("UMIs").toarray()
    path = write(counts_adata, tmp_path / "dense.h5ad")
    tok, _ = preprocess(path, settings())
    assert tok.uns["preprocess"]["counts_source"] == "X"
    assert sp.issparse(tok.X)


def test_seurat_flavour_is_scanpys(tmp_path, counts_adata):
    """`hvg_flavor: seurat` streams the moments of counts per 10,000 over the training
    cells and gives scanpy's `seurat` dispersions_norm and genes (it was median/MAD of raw
    counts' dispersions in quantile bins, which is not scanpy's seurat)."""
    import scanpy as sc

    tok, _ = preprocess_adata(tmp_path / "a.h5ad", counts_adata, "seurat")
    var = pd.DataFrame(index=counts_adata.var_names)
    raw = ad.AnnData(
        counts_adata.layers["UMIs"].astype(np.float64), obs=counts_adata.obs[[]], var=var
    )
    chosen = raw[tok.obs_names[tok.obs["split"] == "train"]].copy()
    sc.pp.normalize_total(chosen, target_sum=1e4)  # library sizes over all genes, as X's
    sc.pp.log1p(chosen)
    sc.pp.highly_variable_genes(chosen, flavor="seurat", n_top_genes=50)
    expected = chosen.var.loc[tok.var_names, "dispersions_norm"].to_numpy()
    np.testing.assert_allclose(tok.var["dispersions_norm"], expected, rtol=1e-6)  # scanpy: float32
    assert set(tok.var_names[tok.var["highly_variable"]]) == set(
        chosen.var_names[chosen.var["highly_variable"]]
    )
    train_counts = chosen.var_names.get_indexer(tok.var_names)
    means = np.asarray(raw[chosen.obs_names].X[:, train_counts].mean(axis=0)).ravel()
    np.testing.assert_allclose(tok.var["mean_counts"], means, rtol=1e-5)  # float32 counts


def test_tokenised_records_its_log1p_for_scanpy(tmp_path, counts_adata, monkeypatch):
    """X is ln(1 + counts per 10,000): uns["log1p"] says so, as sc.pp.log1p would."""
    import scanpy as sc

    tok, _ = preprocess_adata(tmp_path / "a.h5ad", counts_adata, "seurat_v3")
    path = tmp_path / "tok.h5ad"
    tok.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["log1p"] == {"base": None}
    import scanpy.preprocessing._simple as simple

    warned = []
    monkeypatch.setattr(simple.logg, "warning", lambda message, *a, **k: warned.append(message))
    sc.pp.log1p(back)  # scanpy sees the record and warns that X is already logged
    assert warned == ["adata.X seems to be already log-transformed."]
