"""Shared test fixtures: small raw-count h5ad files built here, not by the code under test."""

import math
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from superweights.data.vocab import load_vocab


@pytest.fixture(scope="session")
def vocab():
    return load_vocab()


@pytest.fixture(scope="session")
def vocab_genes(vocab):
    """300 ordinary gene symbols of the vocabulary, plus a mitochondrial gene and AD genes."""
    plain = [g for g in vocab if g.isalnum() and g.isupper() and not g.startswith("LINC")]
    return plain[:300] + ["MT-CO1", "APP", "MAPT", "APOE"]


@pytest.fixture
def counts_adata(vocab_genes):
    return make_counts_adata(vocab_genes)


def make_counts_adata(vocab_genes):
    """2,000 cells x 304 genes, 4 cell types with distinct programmes, 6 donors."""
    rng = np.random.default_rng(1)
    n = 2000
    types = rng.integers(0, 4, n)
    means = rng.gamma(0.5, 1.0, (4, len(vocab_genes))) * 3
    counts = rng.poisson(means[types]).astype(np.float32)
    obs = pd.DataFrame(
        {
            "Subclass": pd.Categorical([f"type{t}" for t in types]),
            "Donor ID": [f"H20.33.{i % 6:03d}" for i in range(n)],
            "Used in analysis": np.arange(n) % 50 != 0,
        },
        index=[f"cell{i}" for i in range(n)],
    )
    norm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    return ad.AnnData(
        X=sp.csr_matrix(norm),
        obs=obs,
        var=pd.DataFrame(index=vocab_genes),
        layers={"UMIs": sp.csr_matrix(counts)},
    )


@pytest.fixture
def counts_h5ad(tmp_path, counts_adata):
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    return path


ROOT = Path(__file__).resolve().parents[1]
SMALL_CONFIG = ROOT / "tests" / "data" / "small_workflow.yaml"


def die_in_epoch_2(real_step, data: ad.AnnData, batch_size: int):
    """A train_step that raises (as a kill would) on the third step of epoch 2."""
    per_epoch = math.ceil((data.obs["split"] == "train").sum() / batch_size)
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    return step


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the workflow on the small test config in `workdir`."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(SMALL_CONFIG), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The whole pipeline on the small config, run locally once per test session."""
    workdir = tmp_path_factory.mktemp("local_run")
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "results" / "small"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: small models run faster, and alike under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
