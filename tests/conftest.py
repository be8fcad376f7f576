"""Shared test fixtures: small raw-count h5ad files built here, not by the code under test."""

import pytest
import torch

from helpers import make_counts_adata, run_snakemake
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


@pytest.fixture
def counts_h5ad(tmp_path, counts_adata):
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    return path


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
