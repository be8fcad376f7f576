"""Figures of the scGPT probe, drawn from its tables (`superweights.probe_cells` outputs).

`plot_layer_spikes` takes `layers.tsv` and `candidates.tsv`, `plot_cell_spikes` takes
`cells.tsv`; `write_figures` saves both as PNG.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .outputs import named_paths, save_figure  # noqa: E402

FIGURES = ("layer_spikes", "cell_spikes")


def _positive(values: pd.Series) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite ones become NaN (not drawn)."""
    v = values.to_numpy(dtype=float)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def plot_layer_spikes(layers: pd.DataFrame, candidates: pd.DataFrame) -> Figure:
    """Round 1: each layer's max |input| and |output| of the down-projection and the medians."""
    first = layers[layers["round"] == 1].sort_values("layer")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = first["layer"].to_numpy()
    ax.plot(x, _positive(first["max_in"]), "o-", color="tab:blue", label="max |input|")
    ax.plot(x, _positive(first["max_out"]), "s-", color="tab:red", label="max |output|")
    ax.plot(x, _positive(first["median_in"]), ":", color="tab:blue", label="median |input|")
    ax.plot(x, _positive(first["median_out"]), ":", color="tab:red", label="median |output|")
    ax.set_yscale("log")
    ax.margins(y=0.12)  # room for the annotations
    accepted = candidates[candidates["accepted"].astype(str).str.lower() == "true"]
    for c in accepted.itertuples():
        ax.axvline(c.layer, color="0.5", lw=0.8, ls="--")
        ax.annotate(
            f"L{c.layer} W[{c.row},{c.col}]",
            (c.layer, abs(c.output_value)),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=9,
        )
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation| of the MLP down-projection")
    found = f"{len(accepted)} candidate(s) marked" if len(accepted) else "no candidate accepted"
    ax.set_title(f"Largest activations per layer, all probed cells ({found})", fontsize=10)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def plot_cell_spikes(cells: pd.DataFrame) -> Figure:
    """Cells x layers heatmap of log10 output spike ratio, cells grouped by cell type."""
    types = list(dict.fromkeys(cells["cell_type"]))
    order = cells.assign(_type=cells["cell_type"].map(types.index))
    order = order.sort_values("_type", kind="stable")
    matrix = order.pivot_table(
        index="cell_id", columns="layer", values="output_ratio", aggfunc="first", sort=False
    )
    ratio = matrix.to_numpy(dtype=float)
    finite = np.isfinite(ratio) & (ratio > 0)
    shown = np.log10(np.where(finite, ratio, np.nan))
    if finite.any():
        shown[np.isposinf(ratio)] = np.nanmax(shown)
    fig, ax = plt.subplots(figsize=(10, 6))
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="magma")
    fig.colorbar(image, ax=ax, label="log10 (max |output| / cell median)")
    labels = order.drop_duplicates("cell_id")["cell_type"].to_numpy()
    bounds = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=0.8)
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(labels)]])
    ax.set_yticks((starts + ends - 1) / 2, labels[starts], fontsize=9)
    ax.set_xticks(range(matrix.shape[1]), matrix.columns)
    ax.set_xlabel("layer")
    ax.set_title(f"Output spike ratio per cell ({len(labels)} cells)", fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(result, outputs) -> list[Path]:
    """Save the figures of a `ScgptProbe` as `layer_spikes.png` and `cell_spikes.png`.

    `outputs`: a folder or the rule's named outputs (`named_paths`).
    """
    paths = named_paths(outputs, {name: f"{name}.png" for name in FIGURES})
    figures = {
        "layer_spikes": plot_layer_spikes(result.layers, result.candidates),
        "cell_spikes": plot_cell_spikes(result.cells),
    }
    return [save_figure(figures[name], paths[name], dpi=120) for name in FIGURES]
