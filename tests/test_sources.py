"""Data sources: SEA-AD bucket, ROSMAP (folder and Synapse), local files, and `fetch`."""

import hashlib
import logging
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml

from http_server import ObjectServer
from superweights.data.demo import write_demo_rosmap
from superweights.data.fetch import fetch
from superweights.data.rosmap import read_mathys2019
from superweights.data.seaad import choose_donors, list_bucket
from superweights.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "2026-06-22"
DONOR_DIR = "MTG/RNAseq/donors_objects"
ADNC = ["Not AD", "Low", "Intermediate", "High"]


def donor_key(donor, release=RELEASE):
    return f"{DONOR_DIR}/{donor}_SEAAD_MTG_RNAseq_final-nuclei.{release}.h5ad"


def donor_h5ad(tmp_path, donor, n_cells, seed, adnc="High"):
    """A tiny SEA-AD-shaped per-donor object, as bytes, and the AnnData it holds."""
    rng = np.random.default_rng(seed)
    counts = sp.random(n_cells, 6, density=0.5, format="csr", random_state=rng, dtype=np.float32)
    counts.data = np.ceil(counts.data * 20)
    subclasses = ["Sst", "Microglia-PVM", "L2/3 IT"][: 1 + seed % 3]
    obs = pd.DataFrame(
        {
            "Donor ID": pd.Categorical([donor] * n_cells),
            "Overall AD neuropathological Change": pd.Categorical([adnc] * n_cells),
            "Subclass": pd.Categorical(rng.choice(subclasses, n_cells)),
            "Number of UMIs": np.asarray(counts.sum(axis=1)).ravel(),
        },
        index=[f"{donor}-nucleus{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(6)]}, index=list("ABCDEF"))
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    adata = ad.AnnData(
        logged, obs=obs, var=var, layers={"UMIs": counts}, uns={"X_normalization": "ln(UP10K+1)"}
    )
    path = tmp_path / f"{donor}.h5ad"
    adata.write_h5ad(path)
    return path.read_bytes(), adata


def config(base_url, **seaad):
    return {
        "seaad": {
            "base_url": base_url,
            "release": RELEASE,
            "region": "MTG",
            "donors": [],
            "n_donors": 2,
            "donor_metadata": "",
            "full_file": False,
            "seed": 0,
        }
        | seaad,
        "download": {"retries": 2, "backoff_seconds": 0.0, "timeout_seconds": 5},
    }


@pytest.fixture
def bucket(tmp_path):
    """Three donors of this release, one of an older release, and an unrelated object."""
    made = tmp_path / "made"
    made.mkdir()
    with ObjectServer(page_size=2) as srv:
        donors = {}
        for seed, (donor, n) in enumerate(
            [("H20.33.001", 5), ("H20.33.002", 7), ("H21.33.003", 4)]
        ):
            data, adata = donor_h5ad(made, donor, n, seed)
            srv.add(donor_key(donor), data)
            donors[donor] = adata
        srv.add(donor_key("H19.33.009", "2024-02-13"), b"old release")
        srv.add("MTG/ATACseq/other.h5ad", b"not RNA")
        srv.donors = donors
        yield srv


def test_list_bucket_follows_continuation_tokens(bucket):
    objects = list_bucket(bucket.url, f"{DONOR_DIR}/", backoff=0.0)
    expected = {k: len(v) for k, v in bucket.objects.items() if k.startswith(DONOR_DIR)}
    assert {o["key"]: o["size"] for o in objects} == expected
    assert all(o["etag"] == hashlib.md5(bucket.objects[o["key"]]).hexdigest() for o in objects)
    pages = [r for r in bucket.requests if r["key"] == ""]
    assert len(pages) == 2  # 4 keys, 2 per page
    assert "continuation-token" not in pages[0]["query"]
    assert "continuation-token" in pages[1]["query"]


def test_fetch_seaad_concatenates_chosen_donors(bucket, tmp_path):
    chosen = ["H20.33.001", "H21.33.003"]
    cfg = config(bucket.url, donors=chosen)
    out = fetch("seaad", cfg, tmp_path / "raw.h5ad", tmp_path / "cache")
    result = ad.read_h5ad(out)
    parts = [bucket.donors[d] for d in chosen]
    assert list(result.obs_names) == [n for p in parts for n in p.obs_names]
    assert list(result.var_names) == list("ABCDEF")
    assert list(result.var["gene_ids"]) == list(parts[0].var["gene_ids"])
    umis = sp.vstack([p.layers["UMIs"] for p in parts]).toarray()
    np.testing.assert_array_equal(result.layers["UMIs"].toarray(), umis)
    np.testing.assert_allclose(result.X.toarray(), np.log1p(umis), rtol=1e-6)
    assert list(result.obs["Donor ID"]) == [
        d for d, p in zip(chosen, parts, strict=True) for _ in p.obs_names
    ]
    assert set(result.obs["Subclass"]) == {s for p in parts for s in p.obs["Subclass"]}
    assert result.uns["X_normalization"] == "ln(UP10K+1)"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        donor_key(d).rsplit("/", 1)[1] for d in chosen
    )
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["raw.h5ad"]


def test_missing_donor_lists_available(bucket, tmp_path):
    with pytest.raises(UserError, match=r"H99\.1\.1.*available: H20\.33\.001, H20\.33\.002"):
        fetch("seaad", config(bucket.url, donors=["H99.1.1"]), tmp_path / "x.h5ad", tmp_path)
    assert not (tmp_path / "x.h5ad").exists()


def test_unknown_release_lists_releases(bucket, tmp_path):
    with pytest.raises(UserError, match="releases found: 2024-02-13, 2026-06-22"):
        fetch("seaad", config(bucket.url, release="2030-01-01"), tmp_path / "x.h5ad", tmp_path)


def test_plain_md5_etag_is_checked(bucket, tmp_path):
    key = donor_key("H20.33.002")
    bucket.etags[key] = "0" * 32
    with pytest.raises(UserError, match="corrupt"):
        fetch("seaad", config(bucket.url, donors=["H20.33.002"]), tmp_path / "x.h5ad", tmp_path)


def test_multipart_etag_is_not_taken_for_md5(bucket, tmp_path):
    key = donor_key("H20.33.002")
    bucket.etags[key] = "0" * 32 + "-3"
    out = fetch("seaad", config(bucket.url, donors=["H20.33.002"]), tmp_path / "x.h5ad", tmp_path)
    assert ad.read_h5ad(out).n_obs == 7


def test_random_draw_is_seeded_and_warns(bucket, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        first = fetch("seaad", config(bucket.url), tmp_path / "a.h5ad", tmp_path / "c")
    again = fetch("seaad", config(bucket.url), tmp_path / "b.h5ad", tmp_path / "c")
    donors_a = set(ad.read_h5ad(first).obs["Donor ID"])
    assert len(donors_a) == 2
    assert donors_a == set(ad.read_h5ad(again).obs["Donor ID"])
    assert "not balanced" in caplog.text


def test_full_file_is_placed_at_out(tmp_path):
    full = b"pretend this is the whole-region h5ad"
    with ObjectServer() as srv:
        srv.add(f"MTG/RNAseq/SEAAD_MTG_RNAseq_final-nuclei.{RELEASE}.h5ad", full)
        srv.add("MTG/RNAseq/SEAAD_MTG_RNAseq_final-nuclei.2024-02-13.h5ad", b"older")
        out = fetch("seaad", config(srv.url, full_file=True), tmp_path / "x.h5ad", tmp_path / "c")
    assert out.read_bytes() == full


def test_balanced_draw_across_adnc_from_metadata_url(tmp_path):
    donors = [f"H20.33.{i:03d}" for i in range(12)]
    levels = [ADNC[i % 4] for i in range(12)]
    table = pd.DataFrame({"Donor ID": donors, "Overall AD neuropathological Change": levels})
    made = tmp_path / "made"
    made.mkdir()
    with ObjectServer() as srv:
        for i, donor in enumerate(donors):
            srv.add(donor_key(donor), donor_h5ad(made, donor, 2, i, adnc=levels[i])[0])
        srv.add("meta/donors.csv", table.to_csv(index=False).encode())
        cfg = config(srv.url, n_donors=4, donor_metadata=f"{srv.url}/meta/donors.csv")
        out = fetch("seaad", cfg, tmp_path / "x.h5ad", tmp_path / "cache")
    obs = ad.read_h5ad(out).obs
    per_donor = obs.groupby("Donor ID", observed=True)["Overall AD neuropathological Change"]
    assert sorted(per_donor.first()) == sorted(ADNC)


def test_balanced_draw_spreads_and_is_reproducible():
    levels = pd.Series(
        ["Not AD"] * 5 + ["Low"] * 1 + ["Intermediate"] * 4 + ["High"] * 6 + ["Reference"] * 2,
        index=[f"D{i:02d}" for i in range(18)],
    )
    pick = choose_donors(list(levels.index), donors=[], n_donors=7, levels=levels, seed=3)
    assert len(set(pick)) == 7
    assert Counter(levels[pick]) == {
        "Not AD": 2,
        "Intermediate": 2,
        "High": 1,
        "Low": 1,
        "Reference": 1,
    }
    assert pick == choose_donors(list(levels.index), donors=[], n_donors=7, levels=levels, seed=3)
    picks = {
        tuple(choose_donors(list(levels.index), donors=[], n_donors=7, levels=levels, seed=s))
        for s in range(5)
    }
    assert len(picks) > 1
    with pytest.raises(UserError, match="n_donors is 30"):
        choose_donors(list(levels.index), donors=[], n_donors=30, levels=levels, seed=0)


# --- ROSMAP ---------------------------------------------------------------------------


def write_mathys(folder, genes_by_cells=True):
    """Tiny Mathys 2019 files; returns the expected cells × genes counts."""
    folder.mkdir(parents=True, exist_ok=True)
    genes = ["APP", "MAPT", "APOE", "TREM2", "SNAP25"]
    counts = np.arange(30, dtype=np.int64).reshape(6, 5) % 4  # cells × genes
    scipy.io.mmwrite(
        folder / "filtered_count_matrix.mtx", sp.coo_matrix(counts.T if genes_by_cells else counts)
    )
    (folder / "filtered_gene_row_names.txt").write_text("\n".join(genes) + "\n")
    cells = pd.DataFrame(
        {
            "TAG": [f"AAAC{i}.{1 + i // 3}" for i in range(6)],
            "projid": [11111111, 11111111, 11111111, 246264, 246264, 246264],
            "broad.cell.type": ["Ex", "In", "Ast", "Mic", "Oli", "Ex"],
            "Subcluster": ["Ex0", "In1", "Ast0", "Mic0", "Oli2", "Ex3"],
        }
    )
    cells.to_csv(folder / "filtered_column_metadata.txt", sep="\t", index=False)
    (folder / "ROSMAP_clinical.csv").write_text(
        "projid,msex,braaksc,ceradsc,cogdx,apoe_genotype,age_death\n"
        "00246264,0,5,1,4,34,90+\n"
        "11111111,1,2,4,1,33,81.5\n"
        "99999999,1,3,3,2,23,77\n"
    )
    return counts, genes, cells


@pytest.mark.parametrize("genes_by_cells", [True, False])
def test_read_mathys2019(tmp_path, genes_by_cells):
    counts, genes, cells = write_mathys(tmp_path / "m", genes_by_cells)
    adata = read_mathys2019(tmp_path / "m")
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.obs_names) == list(cells["TAG"])
    assert list(adata.var_names) == genes
    assert list(adata.obs["braaksc"]) == [2, 2, 2, 5, 5, 5]
    assert list(adata.obs["apoe_genotype"]) == [33, 33, 33, 34, 34, 34]
    assert list(adata.obs["Subcluster"]) == list(cells["Subcluster"])
    assert list(adata.obs["projid"]) == ["11111111"] * 3 + ["246264"] * 3


def test_read_mathys2019_errors(tmp_path):
    write_mathys(tmp_path / "m")
    (tmp_path / "m" / "ROSMAP_clinical.csv").unlink()
    with pytest.raises(UserError, match="ROSMAP_clinical.csv is missing"):
        read_mathys2019(tmp_path / "m")
    write_mathys(tmp_path / "m")
    (tmp_path / "m" / "filtered_gene_row_names.txt").write_text("APP\nMAPT\n")
    with pytest.raises(UserError, match="do not belong together"):
        read_mathys2019(tmp_path / "m")
    write_mathys(tmp_path / "m")
    meta = tmp_path / "m" / "filtered_column_metadata.txt"
    meta.write_text(meta.read_text().replace("AAAC1.1", "AAAC0.1"))
    with pytest.raises(UserError, match="repeats cell TAGs, e.g. AAAC0.1"):
        read_mathys2019(tmp_path / "m")


def rosmap_cfg(path="", synapse=False):
    return {"rosmap": {"path": str(path), "synapse": synapse}}


def test_fetch_rosmap_folder_round_trip(tmp_path):
    counts, genes, _ = write_mathys(tmp_path / "m")
    out = fetch("rosmap", rosmap_cfg(tmp_path / "m"), tmp_path / "raw.h5ad", tmp_path / "c")
    adata = ad.read_h5ad(out)
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.var_names) == genes
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["raw.h5ad"]


def test_rosmap_preset_columns_exist_in_the_loaded_obs(tmp_path):
    preset = yaml.safe_load((ROOT / "config" / "rosmap.yaml").read_text())
    obs = read_mathys2019(write_demo_rosmap(tmp_path / "m", n_cells=300, n_genes=200)).obs
    wanted = [preset["preprocess"]["label_column"], preset["preprocess"]["donor_column"]]
    wanted += preset["ablate"]["strata_columns"] + preset["channels"]["strata_columns"]
    assert {"braaksc", "ceradsc", "cogdx"} <= set(wanted)
    assert set(wanted) <= set(obs.columns)
    assert obs["braaksc"].notna().all()


def test_downloads_stay_in_the_configured_cache_once_each(bucket, tmp_path):
    cache = tmp_path / "cache"
    name = {d: donor_key(d).rsplit("/", 1)[1] for d in bucket.donors}
    cfg = config(bucket.url, donors=["H20.33.001", "H20.33.002"])
    cfg["download"]["cache_dir"] = str(cache)  # fetch's default cache is the config's
    fetch("seaad", cfg, tmp_path / "results" / "a" / "raw.h5ad")
    shutil.rmtree(tmp_path / "results")
    kept = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(kept) == [name["H20.33.001"], name["H20.33.002"]]
    cfg["seaad"]["donors"] = ["H20.33.002", "H21.33.003"]  # a second dataset, same cache
    out = fetch("seaad", cfg, tmp_path / "results" / "b" / "raw.h5ad")
    assert list(ad.read_h5ad(out).obs["Donor ID"].unique()) == ["H20.33.002", "H21.33.003"]
    assert len(bucket.requests_for(donor_key("H20.33.002"))) == 1  # reused, not fetched again
    assert sorted(p.name for p in cache.iterdir()) == sorted(name.values())
    assert (cache / name["H20.33.002"]).stat().st_mtime_ns == kept[name["H20.33.002"]]


def test_fetch_rosmap_needs_exactly_one_source(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        fetch("rosmap", rosmap_cfg(), tmp_path / "x.h5ad", tmp_path)


class FakeSynapse:
    """Stands in for synapseclient.Synapse: records login and serves prepared files."""

    logins: list = []
    source = None
    fail_login = False

    def __init__(self, **kwargs):
        pass

    def login(self, **kwargs):
        FakeSynapse.logins.append(kwargs)
        if FakeSynapse.fail_login:
            raise RuntimeError(f"401 for token {kwargs.get('authToken')}")

    def get(self, syn_id, downloadLocation, ifcollision):
        name = {
            "syn18686381": "filtered_count_matrix.mtx",
            "syn18686382": "filtered_gene_row_names.txt",
            "syn18686372": "filtered_column_metadata.txt",
            "syn3191087": "ROSMAP_clinical.csv",
        }[syn_id]
        target = f"{downloadLocation}/{name}"
        with open(target, "wb") as handle:
            handle.write((FakeSynapse.source / name).read_bytes())
        return types.SimpleNamespace(path=target)


@pytest.fixture
def fake_synapse(tmp_path, monkeypatch):
    module = types.ModuleType("synapseclient")
    module.Synapse = FakeSynapse
    FakeSynapse.logins = []
    FakeSynapse.fail_login = False
    FakeSynapse.source = tmp_path / "portal"
    monkeypatch.setitem(sys.modules, "synapseclient", module)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.synapseConfig
    return FakeSynapse


def test_synapse_download_passes_token_and_never_shows_it(
    tmp_path, fake_synapse, monkeypatch, capsys, caplog
):
    secret = "syn-pat-0123456789abcdef"
    monkeypatch.setenv("SYNAPSE_AUTH_TOKEN", secret)
    counts, _, _ = write_mathys(fake_synapse.source)
    with caplog.at_level(logging.DEBUG):
        out = fetch("rosmap", rosmap_cfg(synapse=True), tmp_path / "raw.h5ad", tmp_path / "cache")
    assert fake_synapse.logins == [{"authToken": secret, "silent": True}]
    np.testing.assert_array_equal(ad.read_h5ad(out).X.toarray(), counts)
    assert (tmp_path / "cache" / "mathys2019" / "ROSMAP_clinical.csv").is_file()
    shown = capsys.readouterr()
    assert secret not in shown.out + shown.err + caplog.text
    assert secret.encode() not in out.read_bytes()


def test_synapse_login_failure_hides_token(tmp_path, fake_synapse, monkeypatch):
    secret = "syn-pat-should-not-leak"
    monkeypatch.setenv("SYNAPSE_AUTH_TOKEN", secret)
    fake_synapse.fail_login = True
    with pytest.raises(UserError, match="login failed") as err:
        fetch("rosmap", rosmap_cfg(synapse=True), tmp_path / "raw.h5ad", tmp_path / "cache")
    assert secret not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_synapse_needs_credentials(tmp_path, fake_synapse, monkeypatch):
    monkeypatch.delenv("SYNAPSE_AUTH_TOKEN", raising=False)
    with pytest.raises(UserError, match="SYNAPSE_AUTH_TOKEN"):
        fetch("rosmap", rosmap_cfg(synapse=True), tmp_path / "raw.h5ad", tmp_path / "cache")
    assert fake_synapse.logins == []


def test_synapse_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "synapseclient", None)
    with pytest.raises(UserError, match=r"superweights\[rosmap\]"):
        fetch("rosmap", rosmap_cfg(synapse=True), tmp_path / "raw.h5ad", tmp_path / "cache")


# --- local and dispatch ------------------------------------------------------------------


def test_fetch_local_links_a_valid_h5ad(tmp_path):
    data, _ = donor_h5ad(tmp_path, "H20.33.001", 3, 0)
    src = tmp_path / "H20.33.001.h5ad"
    out = fetch("local", {"local": {"path": str(src)}}, tmp_path / "out" / "raw.h5ad", tmp_path)
    assert out.read_bytes() == data


@pytest.mark.parametrize("damage", ["text", "truncated", "no_x"])
def test_fetch_local_rejects_unreadable_files(tmp_path, damage):
    data, adata = donor_h5ad(tmp_path, "H20.33.001", 3, 0)
    src = tmp_path / "in.h5ad"
    if damage == "text":
        src.write_text("Donor ID,Subclass\nH20,Sst\n")
    elif damage == "truncated":
        src.write_bytes(data[: len(data) // 2])
    else:
        import h5py

        adata.write_h5ad(src)
        with h5py.File(src, "a") as handle:
            del handle["X"]
    with pytest.raises(UserError) as err:
        fetch("local", {"local": {"path": str(src)}}, tmp_path / "raw.h5ad", tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw.h5ad").exists()


def test_fetch_local_missing_file_and_empty_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        fetch(
            "local", {"local": {"path": str(tmp_path / "nope.h5ad")}}, tmp_path / "r.h5ad", tmp_path
        )
    with pytest.raises(UserError, match="local.path"):
        fetch("local", {"local": {"path": ""}}, tmp_path / "r.h5ad", tmp_path)


def test_fetch_demo_passes_settings(tmp_path):
    cfg = {"demo": {"n_cells": 120, "n_genes": 200, "n_donors": 8, "seed": 1}}
    adata = ad.read_h5ad(fetch("demo", cfg, tmp_path / "demo.h5ad", tmp_path))
    assert adata.shape == (120, 200)
    assert adata.obs["Donor ID"].nunique() == 8


def test_fetch_rejects_unknown_source_and_missing_settings(tmp_path):
    with pytest.raises(UserError, match="unknown data source 'gcs'"):
        fetch("gcs", {}, tmp_path / "x.h5ad", tmp_path)
    with pytest.raises(UserError, match="config lacks demo.seed"):
        fetch(
            "demo", {"demo": {"n_cells": 1, "n_genes": 1, "n_donors": 1}}, tmp_path / "x", tmp_path
        )
