"""The synthetic SEA-AD / ROSMAP demo data: layout, determinism, counts and planted biology."""

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from superweights.data.demo import (
    make_demo_seaad,
    write_demo_rosmap,
    write_demo_seaad,
)
from superweights.data.vocab import load_vocab
from superweights.errors import UserError

ADNC = "Overall AD neuropathological Change"
CATEGORICAL = [
    "Donor ID", "Neurotypical reference", "Brain Region", "Sex", ADNC, "Thal", "Braak",
    "CERAD score", "LATE", "Highest Lewy Body Disease", "Cognitive Status", "APOE Genotype",
    "Severely Affected Donor", "Class", "Subclass", "Supertype", "library_prep", "method",
]  # fmt: skip
NUMERIC = [
    "Age at Death", "Last MMSE Score", "Continuous Pseudo-progression Score", "Class confidence",
    "Subclass confidence", "Supertype confidence", "Number of UMIs", "Genes detected",
    "Fraction mitochondrial UMIs",
]  # fmt: skip
SUBCLASSES = {
    "L2/3 IT", "L4 IT", "L5 IT", "L6 IT", "Pvalb", "Sst", "Vip", "Lamp5", "Astrocyte",
    "Microglia-PVM", "Oligodendrocyte", "OPC", "Endothelial", "VLMC",
}  # fmt: skip
AD_GENES = (
    "APP MAPT APOE TREM2 PSEN1 PSEN2 TYROBP SPP1 CD74 C1QA C1QB CLU BIN1 SORL1 ABCA7 PICALM "
    "CD33 MS4A6A INPP5D PLCG2 BACE1 GSK3B CDK5 CHI3L1 SERPINA3 C3 VIM OSMR GFAP"
).split()
BRAAK_STAGE = {f"Braak {r}": i for i, r in enumerate(["0", "I", "II", "III", "IV", "V", "VI"])}


@pytest.fixture(scope="module")
def seaad():
    return make_demo_seaad()


def mean_by(adata, gene, mask):
    return float(adata[mask, gene].X.mean())


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (make_demo_seaad(n_cells=400, n_genes=600, seed=s) for s in (3, 3, 4))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert (a.X != b.X).nnz == 0 and (a.layers["UMIs"] != b.layers["UMIs"]).nnz == 0
    assert a.uns == b.uns
    assert list(a.var_names) != list(c.var_names)
    assert not a.obs["Donor ID"].equals(c.obs["Donor ID"])


def test_obs_schema(seaad):
    obs = seaad.obs
    assert obs.index.name == "exp_component_name" and obs.index.is_unique
    for column in CATEGORICAL:
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    for column in NUMERIC:
        assert pd.api.types.is_numeric_dtype(obs[column]), column
    assert obs["Used in analysis"].dtype == bool
    assert 0.005 < (~obs["Used in analysis"]).mean() < 0.1
    assert set(obs["Class"]) == {
        "Neuronal: Glutamatergic", "Neuronal: GABAergic", "Non-neuronal and Non-neural",
    }  # fmt: skip
    assert set(obs["Brain Region"]) == {"Middle Temporal Gyrus"}
    assert all(re.fullmatch(r"10Xv3(\.\d)?", m) for m in obs["method"].unique())
    for column in ("Class confidence", "Subclass confidence", "Supertype confidence"):
        assert obs[column].between(0, 1).all()


def test_donors_span_all_adnc_levels(seaad):
    donors = seaad.obs.drop_duplicates("Donor ID")
    assert len(donors) >= 8
    assert all(re.fullmatch(r"H\d\d\.33\.\d{3}", d) for d in donors["Donor ID"])
    assert set(donors[ADNC]) == {"Reference", "Not AD", "Low", "Intermediate", "High"}
    assert set(donors["Sex"]) <= {"Male", "Female"}
    assert all(re.fullmatch(r"[234]/[234]", g) for g in donors["APOE Genotype"])
    is_reference = donors[ADNC] == "Reference"
    assert (is_reference == (donors["Neurotypical reference"] == "True")).all()
    assert donors.groupby("Donor ID", observed=True).size().eq(1).all()


def test_cell_types(seaad):
    obs = seaad.obs
    counts = obs["Subclass"].value_counts()
    assert set(counts.index) == SUBCLASSES and counts.min() >= 60
    assert counts.idxmax() in {"L2/3 IT", "Oligodendrocyte"}
    per_subclass = obs.groupby("Subclass", observed=True)["Supertype"].nunique()
    assert per_subclass.between(1, 3).all()
    assert all(re.fullmatch(r"[\w/ -]+_\d+", s) for s in obs["Supertype"].unique())
    neuronal = obs["Class"].str.startswith("Neuronal")
    assert set(obs.loc[neuronal, "Subclass"]) == {
        "L2/3 IT", "L4 IT", "L5 IT", "L6 IT", "Pvalb", "Sst", "Vip", "Lamp5",
    }  # fmt: skip


def test_counts_and_qc(seaad):
    counts = seaad.layers["UMIs"]
    assert sp.issparse(counts) and counts.format == "csr"
    assert (counts.data >= 0).all() and np.array_equal(counts.data, np.round(counts.data))
    assert counts.nnz / np.prod(counts.shape) < 0.3  # mostly zeros, like 10x nuclei
    dense = counts.toarray().astype(np.float64)
    totals = dense.sum(1)
    mito = dense[:, seaad.var_names.str.startswith("MT-")].sum(1) / totals
    obs = seaad.obs
    np.testing.assert_array_equal(obs["Number of UMIs"], totals)
    np.testing.assert_array_equal(obs["Genes detected"], (dense > 0).sum(1))
    np.testing.assert_allclose(obs["Fraction mitochondrial UMIs"], mito, rtol=1e-6)
    assert 0.005 < np.median(mito) < 0.08
    neurons = obs["Class"].str.startswith("Neuronal").to_numpy()
    assert np.median(totals[neurons]) > 1.5 * np.median(totals[~neurons])


def test_x_is_log_up10k(seaad):
    dense = seaad.layers["UMIs"].toarray().astype(np.float64)
    expected = np.log(dense / dense.sum(1, keepdims=True) * 10_000 + 1)
    assert sp.issparse(seaad.X) and seaad.X.dtype == np.float32
    np.testing.assert_allclose(seaad.X.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert seaad.uns["X_normalization"] == "ln(UP10K+1)"
    assert seaad.uns["demo"]["synthetic"] and seaad.uns["demo"]["seed"] == 0


def test_genes_are_scgpt_vocabulary_symbols(seaad):
    vocab = load_vocab()
    genes = list(seaad.var_names)
    assert len(genes) == 2400 and len(set(genes)) == len(genes)
    assert all(g in vocab for g in genes)
    assert set(AD_GENES) <= set(genes)
    assert {"MT-CO1", "MT-ND1", "MT-ATP6"} <= set(genes)
    assert list(seaad.var["feature_name"]) == genes
    assert not any(g.startswith(("LINC", "ENSG")) or "." in g or "orf" in g for g in genes)


@pytest.mark.parametrize(
    ("gene", "subclass"),
    [("P2RY12", "Microglia-PVM"), ("MBP", "Oligodendrocyte"), ("GFAP", "Astrocyte"),
     ("PDGFRA", "OPC"), ("CLDN5", "Endothelial"), ("DCN", "VLMC"), ("SST", "Sst"),
     ("PVALB", "Pvalb"), ("VIP", "Vip"), ("CUX2", "L2/3 IT")],
)  # fmt: skip
def test_markers_far_higher_in_their_subclass(seaad, gene, subclass):
    inside = (seaad.obs["Subclass"] == subclass).to_numpy()
    assert mean_by(seaad, gene, inside) > 4 * mean_by(seaad, gene, ~inside)


def test_disease_programmes_grow_with_adnc(seaad):
    obs = seaad.obs
    high = (obs[ADNC] == "High").to_numpy()
    low = obs[ADNC].isin(["Reference", "Not AD"]).to_numpy()
    for subclass, genes in (("Microglia-PVM", ["TREM2", "APOE", "SPP1"]),
                            ("Astrocyte", ["GFAP", "CHI3L1", "SERPINA3"])):  # fmt: skip
        cells = (obs["Subclass"] == subclass).to_numpy()
        for gene in genes:
            assert mean_by(seaad, gene, cells & high) > 1.3 * mean_by(seaad, gene, cells & low)


def test_vulnerable_neurons_are_lost_in_high_adnc(seaad):
    share = pd.crosstab(seaad.obs[ADNC], seaad.obs["Subclass"], normalize="index")
    control = share.loc[["Reference", "Not AD"]].mean()
    for subclass in ("L2/3 IT", "L4 IT", "Sst"):
        assert share.loc["High", subclass] < 0.8 * control[subclass]


def test_app_and_mapt_are_neuronal(seaad):
    neurons = seaad.obs["Class"].str.startswith("Neuronal").to_numpy()
    for gene in ("APP", "MAPT"):
        assert mean_by(seaad, gene, neurons) > 2 * mean_by(seaad, gene, ~neurons)


def test_subclass_is_learnable_from_hvgs(seaad):
    x = seaad.X.toarray()
    x = x[:, np.argsort(x.var(0))[-1000:]]
    labels = seaad.obs["Subclass"].to_numpy()
    train = np.random.default_rng(0).random(len(x)) < 0.5
    names = np.unique(labels)
    centroids = np.stack([x[train & (labels == n)].mean(0) for n in names])
    test = x[~train]
    distance = (test**2).sum(1)[:, None] - 2 * test @ centroids.T + (centroids**2).sum(1)
    assert (names[distance.argmin(1)] == labels[~train]).mean() >= 0.9


def test_neuropathology_follows_nia_aa():
    donors = make_demo_seaad(n_cells=300, n_genes=400, n_donors=100, seed=1).obs
    donors = donors.drop_duplicates("Donor ID")
    braak = donors["Braak"].map(BRAAK_STAGE).astype(int)
    adnc = donors[ADNC]
    assert braak[adnc == "High"].ge(5).all()
    assert braak[adnc.isin(["Reference", "Not AD"])].le(2).all()
    assert braak[adnc == "Intermediate"].ge(3).all()
    assert (donors.loc[adnc.isin(["Reference", "Not AD"]), "Thal"] == "Thal 0").all()
    assert donors.loc[adnc == "High", "Thal"].isin(["Thal 4", "Thal 5"]).all()
    assert donors.loc[adnc == "High", "CERAD score"].isin(["Moderate", "Frequent"]).all()
    level = adnc.map({"Reference": 0, "Not AD": 1, "Low": 2, "Intermediate": 3, "High": 4})
    assert np.corrcoef(level.astype(float), braak)[0, 1] > 0.8
    e4 = donors["APOE Genotype"].astype(str).str.count("4")
    assert e4[adnc == "High"].mean() > e4[adnc.isin(["Reference", "Not AD"])].mean() + 0.3
    score = donors["Continuous Pseudo-progression Score"]
    assert score[adnc == "High"].min() > score[adnc == "Not AD"].max()


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="n_donors"):
        make_demo_seaad(n_cells=100, n_donors=3)
    with pytest.raises(UserError, match="n_genes"):
        make_demo_seaad(n_cells=100, n_genes=20)
    with pytest.raises(UserError, match="n_cells"):
        make_demo_seaad(n_cells=0)


def test_write_demo_seaad_round_trip(tmp_path):
    path = write_demo_seaad(tmp_path / "demo" / "seaad.h5ad", n_cells=300, n_genes=500, seed=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["seaad.h5ad"]
    back = ad.read_h5ad(path)
    again = make_demo_seaad(n_cells=300, n_genes=500, seed=2)
    assert back.obs.index.name == "exp_component_name"
    pd.testing.assert_frame_equal(back.obs, again.obs)
    assert (back.layers["UMIs"] != again.layers["UMIs"]).nnz == 0
    assert back.uns["X_normalization"] == "ln(UP10K+1)"


def test_write_demo_rosmap_parses_back(tmp_path):
    folder = tmp_path / "rosmap"
    write_demo_rosmap(folder, n_cells=600, n_genes=500, n_donors=8, seed=0)
    first = (folder / "filtered_count_matrix.mtx").read_bytes()
    write_demo_rosmap(folder, n_cells=600, n_genes=500, n_donors=8, seed=0)  # over an old copy
    assert [p.name for p in tmp_path.iterdir()] == ["rosmap"]
    assert (folder / "filtered_count_matrix.mtx").read_bytes() == first

    matrix = scipy.io.mmread(folder / "filtered_count_matrix.mtx")
    genes = (folder / "filtered_gene_row_names.txt").read_text().split("\n")[:-1]
    cells = pd.read_csv(folder / "filtered_column_metadata.txt", sep="\t")
    clinical = pd.read_csv(folder / "ROSMAP_clinical.csv")
    assert matrix.shape == (500, 600) and np.issubdtype(matrix.dtype, np.integer)
    assert matrix.min() >= 0
    assert len(genes) == 500 and len(set(genes)) == 500 and set(genes) <= set(load_vocab())
    assert list(cells.columns) == [
        "TAG", "projid", "tsne1", "tsne2", "pre.cluster", "broad.cell.type", "Subcluster",
    ]  # fmt: skip
    assert len(cells) == 600 and cells["TAG"].is_unique
    assert set(cells["broad.cell.type"]) == {"Ex", "In", "Ast", "Oli", "Opc", "Mic", "End", "Per"}
    assert all(
        s.startswith(b) for s, b in zip(cells["Subcluster"], cells["broad.cell.type"], strict=True)
    )
    assert set(cells["projid"]) <= set(clinical["projid"])
    for column in (
        "projid", "study", "msex", "educ", "race", "spanish", "apoe_genotype", "age_at_visit_max",
        "age_first_ad_dx", "age_death", "cts_mmse30_first_ad_dx", "cts_mmse30_lv", "pmi",
        "braaksc", "ceradsc", "cogdx", "dcfdx_lv", "individualID",
    ):  # fmt: skip
        assert column in clinical.columns, column
    assert len(clinical) == 8 and clinical["projid"].is_unique
    assert clinical["braaksc"].between(0, 6).all() and clinical["ceradsc"].between(1, 4).all()
    assert clinical["cogdx"].between(1, 6).all()
    assert set(clinical["apoe_genotype"]) <= {22, 23, 24, 33, 34, 44}
    ages = clinical["age_death"].astype(str)
    assert all(a == "90+" or 60 < float(a) < 90 for a in ages)
    # sicker donors (lower CERAD code = more plaques) have higher Braak stages
    assert np.corrcoef(clinical["ceradsc"], clinical["braaksc"])[0, 1] < -0.5
