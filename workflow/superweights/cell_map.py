"""Which cells depend on a super weight, and which genes go with that dependence.

Reads the pruning stage's `cells.h5ad` (per evaluated cell: `<cls>` embedding, cell type,
donor, AD strata, each candidate's effect `effect <candidate>` = drop of log p(true type)
when the weight is zeroed, and the same for up to 99 of its magnitude-matched null weights,
`obsm["null <candidate>"]`).

- **Cell map**: a UMAP of the `<cls>` embeddings (scanpy `pp.neighbors`, `tl.umap`).
- **Gene–effect association**, within cell types so that identity does not drive it. In each
  cell type with at least `min_cells` cells, the Spearman correlation r_c between a gene's
  expression (log1p of counts per 10,000) and the per-cell effect becomes Fisher's
  z_c = atanh(r_c)·sqrt(n_c − 3); the types are combined by Stouffer's S = Σ z_c / sqrt(m)
  over the m types where the gene varies. The same statistic for each null weight's per-cell
  effects gives the null: z = (S − mean S_null) / sd S_null and the two-sided empirical
  p_null = (1 + #{|S_null − mean| ≥ |S − mean|}) / (n_null + 1). A gene is ranked when it is
  expressed in at least `min_cells` of the cells used. Positive z: cells expressing the gene
  more depend more on the weight than they would on a comparable weight. The empirical p
  cannot go below 1 / (n_null + 1), too coarse for thousands of genes, so `p_z` reads z on
  the normal (S under the null is a sum of near-normal Fisher z's, standardised by the null
  weights' own mean and sd) and `q_z` is Benjamini-Hochberg over the candidate's ranked
  genes. `status`: "confirmed", or "exploratory" for a candidate the pruning test did not
  confirm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import false_discovery_control, norm, rankdata

from .data.preprocess import normalise
from .errors import UserError
from .outputs import named_paths, write_h5ad, write_json, write_tsv

log = logging.getLogger(__name__)

ASSOCIATION_COLUMNS = ["candidate", "status", "gene", "n_cells", "n_expressing", "n_types",
                       "stouffer", "null_stouffer_mean", "null_stouffer_sd", "z", "p_null",
                       "p_z", "q_z", "rank"]  # fmt: skip
OUTPUT_FILES = {"cells": "cells.h5ad", "association": "association.tsv",
                "summary": "summary.json"}  # fmt: skip


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
    library sizes (as preprocessing normalises before binning)."""
    missing = cell_ids.difference(tokenised.obs_names)
    if len(missing):
        raise UserError(f"{len(missing)} evaluated cells are not in the tokenised data")
    part = tokenised[cell_ids]
    counts = sp.csr_matrix(part.layers["counts"] if "counts" in part.layers else part.X)
    totals = part.obs["total_counts"].to_numpy(float) if "total_counts" in part.obs else None
    if totals is None:
        totals = np.asarray(counts.sum(axis=1)).ravel()
    logged = normalise(counts, totals).toarray()
    return ad.AnnData(X=logged, obs=part.obs[[]], var=part.var[[]])


def add_umap(cells: ad.AnnData, seed: int = 0) -> bool:
    """UMAP of the `<cls>` embeddings into `obsm["X_umap"]`; False when too few cells."""
    import scanpy as sc

    if cells.n_obs < 5:
        return False
    sc.pp.neighbors(cells, n_neighbors=min(15, cells.n_obs - 1), use_rep="X_cls",
                    random_state=seed)  # fmt: skip
    sc.tl.umap(cells, random_state=seed)
    return True


def _standardised_ranks(values: np.ndarray) -> np.ndarray:
    """Column ranks, centred and scaled to unit norm; constant columns become NaN."""
    ranks = rankdata(values, axis=0)
    ranks -= ranks.mean(axis=0)
    norm = np.sqrt((ranks**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 1e-12, ranks / norm, np.nan)


def association(
    cells: ad.AnnData, expr: ad.AnnData, candidate: str, min_cells: int
) -> pd.DataFrame:
    """Each gene's within-cell-type association with `candidate`'s per-cell effect, as a
    z-score against its null weights (see the module docstring)."""
    effects = np.column_stack([cells.obs[f"effect {candidate}"].to_numpy(float),
                               cells.obsm[f"null {candidate}"]])  # fmt: skip
    if effects.shape[1] < 3:
        raise UserError(f"{candidate}: fewer than 2 null weights, no null for the association")
    x = np.asarray(expr.X, dtype=float)
    total = np.zeros((x.shape[1], effects.shape[1]))
    types = np.zeros((x.shape[1], effects.shape[1]))
    used = np.zeros(len(cells), bool)
    for kind in pd.unique(cells.obs["cell_type"]):
        rows = (cells.obs["cell_type"] == kind).to_numpy()
        n = int(rows.sum())
        if n < max(min_cells, 4):
            continue
        r = _standardised_ranks(x[rows]).T @ _standardised_ranks(effects[rows])
        z = np.arctanh(np.clip(r, -0.999999, 0.999999)) * np.sqrt(n - 3)
        defined = np.isfinite(z)
        total += np.where(defined, z, 0.0)
        types += defined
        used |= rows
    with np.errstate(invalid="ignore", divide="ignore"):
        stouffer = total / np.sqrt(types)
    own, null = stouffer[:, 0], stouffer[:, 1:]
    mean, sd = null.mean(axis=1), null.std(axis=1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (own - mean) / sd
    extreme = (np.abs(null - mean[:, None]) >= np.abs(own - mean)[:, None]).sum(axis=1)
    table = pd.DataFrame(
        {
            "candidate": candidate,
            "gene": expr.var_names.astype(str),
            "n_cells": int(used.sum()),
            "n_expressing": (x[used] > 0).sum(axis=0),
            "n_types": types[:, 0].astype(int),
            "stouffer": own,
            "null_stouffer_mean": mean,
            "null_stouffer_sd": sd,
            "z": z,
            "p_null": (1 + extreme) / (null.shape[1] + 1),
        }
    )
    table = table[np.isfinite(table["z"]) & (table["n_expressing"] >= min_cells)]
    table = table.sort_values("z", ascending=False, kind="stable").reset_index(drop=True)
    table["p_z"] = 2 * norm.sf(table["z"].abs())
    table["q_z"] = false_discovery_control(table["p_z"]) if len(table) else []
    table["rank"] = np.arange(1, len(table) + 1)
    confirmed = candidate in cells.uns.get("confirmed", [])
    table["status"] = "confirmed" if confirmed else "exploratory"
    return table[ASSOCIATION_COLUMNS]


def map_cells(cells: ad.AnnData, tokenised: ad.AnnData, min_cells: int = 10,
              seed: int = 0) -> CellMapResult:  # fmt: skip
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
        effect = cells.obs[f"effect {cid}"].to_numpy(float)
        if not np.any(effect != 0):
            flat.append(cid)
            notes.append(f"{cid}: every cell's effect is exactly 0; no cell depends on it")
            continue
        if cells.obsm[f"null {cid}"].shape[1] < 2:
            notes.append(f"{cid}: fewer than 2 null weights; no gene association without a null")
            continue
        frames.append(association(cells, expr, cid, min_cells))
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
        "n_genes_ranked": {c: int((table["candidate"] == c).sum()) for c in candidates},
        "notes": notes,
    }
    for note in notes:
        log.info(note)
    return CellMapResult(cells, table, summary)


def write_outputs(result: CellMapResult, outputs) -> list[Path]:
    """cells.h5ad (with the UMAP), association.tsv and summary.json, each atomically."""
    paths = named_paths(outputs, OUTPUT_FILES)
    return [
        write_h5ad(result.cells, paths["cells"]),
        write_tsv(paths["association"], result.association),
        write_json(paths["summary"], result.summary),
    ]
