"""Which cells depend on a super weight, and which genes go with that dependence.

Reads the pruning stage's `cells.h5ad` (per evaluated cell: `<cls>` embedding, cell type,
donor, AD strata, its baseline log p(true type) `log_likelihood`, and each candidate's
effect `effect_<candidate>` (`outputs.cell_key`) = drop of log p(true type) when the weight
is zeroed). The written cells.h5ad carries the cells' log1p CP10k expression in `X` (genes
in `var`), so that `sc.pl.umap(cells, color="APOE")` works.

- **Cell map**: a UMAP of the `<cls>` embeddings (scanpy `pp.neighbors`, `tl.umap`).
- **Gene–effect association**, donor-aware, within donor × cell type so that neither
  identity nor donor drives it. The per-cell effect and each gene's expression (log1p of
  counts per 10,000) are residualised by least squares on donor × cell type indicators and
  on the cell's log library size, genes detected and baseline log p(true type); the
  statistic is the partial correlation `partial_r` of the two residuals. Its null comes from
  permuting the effect's residuals within donor × cell type (Freedman & Lane 1983: the
  permuted residuals are residualised again, `n_permutations` times, seeded), so cells are
  only exchanged with cells of the same donor and type. `p_null` = (1 + #{|r_perm| >= |r|})
  / (n_permutations + 1), two-sided; `q` is Benjamini-Hochberg over the candidate's ranked
  genes; `z` = r / sd(r_perm) orders the genes (the enrichment's cell-level ranking).
  Groups with fewer than 3 cells carry no information and are left out; a gene is ranked
  when it is expressed in at least `min_cells` of the cells used. `status`: "confirmed", or
  "exploratory" for a candidate the pruning test did not confirm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import false_discovery_control

from .data.preprocess import normalise, read_tokenised
from .errors import UserError
from .outputs import cell_key, named_paths, write_h5ad, write_json, write_tsv

log = logging.getLogger(__name__)

ASSOCIATION_COLUMNS = ["candidate", "status", "gene", "n_cells", "n_groups", "n_donors",
                       "n_expressing", "partial_r", "null_sd", "z", "p_null", "q",
                       "rank"]  # fmt: skip
COVARIATES = ("log_library_size", "genes_detected", "log_likelihood")
"""Per-cell covariates regressed out of effect and expression, beside donor × cell type."""
MIN_GROUP = 3
"""Cells a donor × cell type group needs to enter the association."""
OUTPUT_FILES = {"cells": "cells.h5ad", "association": "association.tsv",
                "summary": "summary.json"}  # fmt: skip
FIGURE_FILES = {"figure": "umap.png"}


@dataclass
class CellMapResult:
    """The cells with their UMAP, the association table and notes for the report."""

    cells: ad.AnnData
    association: pd.DataFrame
    summary: dict


def read_cells(path: str | Path) -> ad.AnnData:
    """The pruning stage's cells.h5ad, checked."""
    try:
        cells = ad.read_h5ad(path)
    except (OSError, KeyError) as err:
        raise UserError(f"cannot read the cells file {path}: {err}") from err
    missing = [k for k in ("cell_type", "donor") if k not in cells.obs]
    if "X_cls" not in cells.obsm or missing:
        raise UserError(f"{path} lacks X_cls or obs {missing}: not a cells.h5ad of `ablate`")
    return cells


def log_expression(tokenised: ad.AnnData, cell_ids: pd.Index) -> ad.AnnData:
    """log1p(counts per 10,000) of `cell_ids`, from the tokenised data's raw counts and
    library sizes (as preprocessing normalises before binning), with each cell's
    `log_library_size` and `genes_detected` in obs."""
    missing = cell_ids.difference(tokenised.obs_names)
    if len(missing):
        raise UserError(f"{len(missing)} evaluated cells are not in the tokenised data")
    part = tokenised[cell_ids]
    counts = sp.csr_matrix(part.layers["counts"] if "counts" in part.layers else part.X)
    totals = part.obs["total_counts"].to_numpy(float) if "total_counts" in part.obs else None
    if totals is None:
        totals = np.asarray(counts.sum(axis=1)).ravel()
    logged = normalise(counts, totals).toarray()
    obs = pd.DataFrame(
        {"log_library_size": np.log1p(totals), "genes_detected": counts.getnnz(axis=1)},
        index=part.obs_names,
    )
    return ad.AnnData(X=logged, obs=obs, var=part.var[[]])


def add_umap(cells: ad.AnnData, seed: int = 0) -> bool:
    """UMAP of the `<cls>` embeddings into `obsm["X_umap"]`; False when too few cells."""
    import scanpy as sc

    if cells.n_obs < 5:
        return False
    sc.pp.neighbors(cells, n_neighbors=min(15, cells.n_obs - 1), use_rep="X_cls",
                    random_state=seed)  # fmt: skip
    sc.tl.umap(cells, random_state=seed)
    return True


def association(
    cells: ad.AnnData,
    expr: ad.AnnData,
    candidate: str,
    min_cells: int,
    n_permutations: int = 999,
    seed: int = 0,
) -> pd.DataFrame:
    """Each gene's partial correlation with `candidate`'s per-cell effect within donor ×
    cell type, with its within-group permutation p (see the module docstring)."""
    groups = cells.obs["donor"].astype(str) + "\x1f" + cells.obs["cell_type"].astype(str)
    sizes = groups.map(groups.value_counts())
    used = (sizes >= MIN_GROUP).to_numpy()
    if used.sum() < MIN_GROUP + len(COVARIATES) + 1:
        raise UserError(
            f"{candidate}: only {int(used.sum())} cells in donor × cell type groups of at "
            f"least {MIN_GROUP}; too few for a donor-aware association"
        )
    labels = groups[used].to_numpy()
    covariates = np.column_stack([
        expr.obs["log_library_size"].to_numpy(float)[used],
        expr.obs["genes_detected"].to_numpy(float)[used],
        cells.obs["log_likelihood"].to_numpy(float)[used],
    ])  # fmt: skip
    basis = _design_basis(labels, covariates)
    x = np.asarray(expr.X, dtype=float)[used]
    effect = _residual(basis, cells.obs[cell_key("effect", candidate)].to_numpy(float)[used, None])
    orders = _within_group_permutations(labels, n_permutations, seed)
    permuted = _residual(basis, effect[:, 0][orders].T)  # Freedman-Lane: residualised again
    rx = _residual(basis, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        norms = np.linalg.norm(rx, axis=0)
        r = (rx.T @ effect)[:, 0] / (norms * np.linalg.norm(effect))
        null = (rx.T @ permuted) / (norms[:, None] * np.linalg.norm(permuted, axis=0))
    sd = null.std(axis=1, ddof=1)
    extreme = (np.abs(null) >= np.abs(r)[:, None] - 1e-12).sum(axis=1)
    table = pd.DataFrame(
        {
            "candidate": candidate,
            "gene": expr.var_names.astype(str),
            "n_cells": int(used.sum()),
            "n_groups": len(set(labels)),
            "n_donors": cells.obs["donor"][used].nunique(),
            "n_expressing": (x > 0).sum(axis=0),
            "partial_r": r,
            "null_sd": sd,
            "z": r / sd,
            "p_null": (1 + extreme) / (n_permutations + 1),
        }
    )
    table = table[np.isfinite(table["z"]) & (table["n_expressing"] >= min_cells)]
    table = table.sort_values("z", ascending=False, kind="stable").reset_index(drop=True)
    table["q"] = false_discovery_control(table["p_null"]) if len(table) else []
    table["rank"] = np.arange(1, len(table) + 1)
    confirmed = candidate in cells.uns.get("confirmed", [])
    table["status"] = "confirmed" if confirmed else "exploratory"
    return table[ASSOCIATION_COLUMNS]


def _design_basis(labels: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the design: group indicators and standardised covariates."""
    indicators = pd.get_dummies(labels).to_numpy(float)
    spread = covariates.std(axis=0)
    scaled = (covariates - covariates.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    q, r = np.linalg.qr(np.column_stack([indicators, scaled]))
    return q[:, np.abs(np.diag(r)) > 1e-10]  # drop a covariate that adds nothing


def _residual(basis: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` [n, k] minus their least-squares fit on the design `basis`."""
    return values - basis @ (basis.T @ values)


def _within_group_permutations(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[n, cells] row orders, each permuting cells only within their group."""
    rng = np.random.default_rng(seed)
    orders = np.tile(np.arange(len(labels)), (n, 1))
    for label in pd.unique(labels):
        members = np.flatnonzero(labels == label)
        orders[:, members] = rng.permuted(np.tile(members, (n, 1)), axis=1)
    return orders


def map_cells(cells: ad.AnnData, tokenised: ad.AnnData, min_cells: int = 10, seed: int = 0,
              n_permutations: int = 999) -> CellMapResult:  # fmt: skip
    """UMAP of the evaluated cells and the gene–effect association of every candidate."""
    candidates = [str(c) for c in cells.uns.get("candidates", [])]
    notes = []
    n_types = cells.obs["cell_type"].nunique()
    if n_types < 2:
        notes.append(
            f"the evaluated cells hold {n_types} cell type(s): the association is within that "
            "type only and no comparison between types is possible"
        )
    if not add_umap(cells, seed):
        notes.append(f"only {cells.n_obs} evaluated cells: too few for a cell map")
    expr = log_expression(tokenised, cells.obs_names)
    frames, flat = [], []
    for cid in candidates:
        effect = cells.obs[cell_key("effect", cid)].to_numpy(float)
        if not np.any(effect != 0):
            flat.append(cid)
            notes.append(f"{cid}: every cell's effect is exactly 0; no cell depends on it")
            continue
        frames.append(association(cells, expr, cid, min_cells, n_permutations, seed))
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=ASSOCIATION_COLUMNS)
    )
    summary = {
        "n_cells": cells.n_obs,
        "n_cell_types": int(n_types),
        "candidates": candidates,
        "all_zero_effects": flat,
        "umap": "X_umap" in cells.obsm,
        "min_cells": min_cells,
        "n_permutations": n_permutations,
        "n_genes_ranked": {c: int((table["candidate"] == c).sum()) for c in candidates},
        "notes": notes,
    }
    for note in notes:
        log.info(note)
    return CellMapResult(with_expression(cells, expr), table, summary)


def with_expression(cells: ad.AnnData, expr: ad.AnnData) -> ad.AnnData:
    """`cells` (obs, obsm, obsp, uns) with `expr`'s log1p CP10k values in `X` and its genes
    in `var`, in scanpy's conventions (`uns["log1p"]`)."""
    return ad.AnnData(
        X=sp.csr_matrix(np.asarray(expr.X, dtype=np.float32)),
        obs=cells.obs,
        var=pd.DataFrame(index=expr.var_names.astype(str)),
        obsm=dict(cells.obsm),
        obsp=dict(cells.obsp),
        uns=dict(cells.uns) | {"log1p": {"base": None}},
    )


def write_outputs(result: CellMapResult, outputs) -> list[Path]:
    """cells.h5ad (with the UMAP), association.tsv and summary.json, each atomically."""
    paths = named_paths(outputs, OUTPUT_FILES)
    return [
        write_h5ad(result.cells, paths["cells"]),
        write_tsv(paths["association"], result.association),
        write_json(paths["summary"], result.summary),
    ]


def run(inputs, outputs, settings) -> CellMapResult:
    """The cells stage: `map_cells` of the pruning stage's `inputs["cells"]` with the
    expression of `inputs["data"]`; write the files of `write_outputs` and the cell map
    figure (`FIGURE_FILES`) to `outputs`.

    `settings`: `min_cells`, `seed` and `n_permutations` by name (the channels section).
    """
    from .cell_map_plots import write_cell_map_figure

    result = map_cells(
        read_cells(inputs["cells"]),
        read_tokenised(inputs["data"]),
        min_cells=settings["min_cells"],
        seed=settings["seed"],
        n_permutations=settings["n_permutations"],
    )
    write_outputs(result, outputs)
    write_cell_map_figure(result.cells, named_paths(outputs, FIGURE_FILES)["figure"])
    return result
