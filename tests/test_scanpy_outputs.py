"""Every AnnData the demo writes opens in scanpy and follows its conventions."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

pytestmark = pytest.mark.slow

# Written by the pipeline (raw/data.h5ad is the source's own object, kept as it came).
OUTPUTS = ["preprocess/tokenised.h5ad", "ablate/cells.h5ad", "cells/cells.h5ad"]


@pytest.fixture(scope="module", params=OUTPUTS)
def written(request, small_run):
    return request.param, sc.read_h5ad(small_run / request.param)


def test_the_cell_type_has_one_name(written):
    name, adata = written
    assert "cell_type" in adata.obs, (name, list(adata.obs))
    assert "label" not in adata.obs, name
    assert adata.obs["cell_type"].notna().all(), name


def test_names_are_unique_and_keys_are_identifiers(written, small_run):
    name, adata = written
    assert adata.obs_names.is_unique and adata.var_names.is_unique, name
    source = set(ad.read_h5ad(small_run / "raw/data.h5ad", backed="r").obs.columns)
    own = [key for key in adata.obs.columns if key not in source]  # the source's kept as is
    for key in [*own, *adata.obsm.keys(), *adata.uns.keys(), *adata.layers.keys()]:
        assert key.isidentifier(), (name, key)


def test_log_normalised_x_is_declared(written):
    """X holding log1p CP10k says so in uns['log1p'], so scanpy will not log it again."""
    name, adata = written
    if adata.n_vars == 0:
        pytest.skip(f"{name} holds no expression")
    assert "log1p" in adata.uns, name
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    assert x.min() >= 0, name
    totals = np.expm1(x.astype(np.float64)).sum(axis=1)
    # HVG subsetting keeps part of each cell's 10,000 counts-per-ten-thousand.
    assert (totals <= 1e4 * (1 + 1e-4)).all() and np.median(totals) > 100, name


def test_scanpy_ranks_genes_by_cell_type(small_run):
    adata = sc.read_h5ad(small_run / "preprocess/tokenised.h5ad")
    sc.tl.rank_genes_groups(adata, "cell_type", method="wilcoxon")
    names = adata.uns["rank_genes_groups"]["names"]
    assert set(names.dtype.names) == set(adata.obs["cell_type"].cat.categories)
