"""The cell map figure: UMAP of the evaluated cells by cell type, AD stage and each
candidate's per-cell effect (scanpy's `pl.umap`), drawn at full report width."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .outputs import cell_key, save_figure  # noqa: E402

ADNC = "Overall AD neuropathological Change"
ADNC_ORDER = ("Reference", "Not AD", "Low", "Intermediate", "High")
MAX_EFFECT_PANELS = 4
COLUMNS = 2


def plot_cell_map(cells: ad.AnnData) -> Figure:
    """Panels: cell type, ADNC (when present), then the effect of up to 4 candidates, on a
    colour scale centred at 0 (red: the cell's log p(true type) drops when pruned). 11 inches
    wide, so that 10-pt labels stay at least 9 pt in the report's 1,050-pixel column."""
    import scanpy as sc

    if "X_umap" not in cells.obsm:
        fig, ax = plt.subplots(figsize=(12, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no cell map: only {cells.n_obs} evaluated cells", ha="center")
        return fig
    panels = ["cell_type"] + ([ADNC] if ADNC in cells.obs else [])
    if ADNC in cells.obs and set(cells.obs[ADNC].astype(str)) <= set(ADNC_ORDER):
        cells = cells.copy()  # stages in their order, not alphabetical
        present = [s for s in ADNC_ORDER if s in set(cells.obs[ADNC].astype(str))]
        cells.obs[ADNC] = pd.Categorical(cells.obs[ADNC].astype(str), categories=present)
    effects = [cell_key("effect", c) for c in cells.uns.get("candidates", [])]
    effects = effects[:MAX_EFFECT_PANELS]
    panels += effects
    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(11, 4.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        title = key if key != "cell_type" else "cell type"
        if key in effects:
            values = cells.obs[key].to_numpy(float)
            limit = float(np.quantile(np.abs(values), 0.99)) or 1.0
            sc.pl.umap(cells, color=key, ax=ax, show=False, cmap="RdBu_r", vmin=-limit,
                       vmax=limit, title=f"{title} (nats)", size=40)  # fmt: skip
        else:
            sc.pl.umap(cells, color=key, ax=ax, show=False, title=title, size=40)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_cell_map_figure(cells: ad.AnnData, path: str | Path) -> Path:
    """Save the cell map figure."""
    return save_figure(plot_cell_map(cells), path, dpi=110)
