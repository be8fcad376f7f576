"""Figure of spikes_over_training.tsv: spike ratios per layer and tracked weights against step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..outputs import save_figure  # noqa: E402
from .spikes import CLS  # noqa: E402

OUTPUT_RATIO = 100.0  # the probe's default output_ratio, drawn for scale


def _steps(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The tables one after another, steps of each phase continuing from the previous one."""
    parts, offset = [], 0
    for table in tables:
        if table.empty:
            continue
        parts.append(table.assign(step=table["step"] + offset))
        offset += int(table["step"].max())
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_spikes(tables: list[pd.DataFrame], path: str | Path) -> Path:
    """Output and input ratio per layer (marker filled where the output spike sits on
    `<cls>`) and each tracked weight's value over its first recorded value, against step.

    Several tables (pretraining, then fine-tuning) continue one another along the step
    axis, with a line where a phase starts.
    """
    frame = _steps(tables)
    fig, axes = plt.subplots(3, 1, figsize=(10, 11))  # report width: labels stay legible
    if frame.empty:
        for ax in axes:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "no statistics recorded over training (spike_cells: 0)",
                     ha="center", va="center")  # fmt: skip
        return save_figure(fig, path)
    layers = frame[frame["record"] == "layer"]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.95, layers["layer"].nunique()))
    for ax, column, token, title in (
        (axes[0], "ratio_out", "token_out", "largest |output| / layer median"),
        (axes[1], "ratio_in", "token_in", "largest |input| / layer median"),
    ):
        for color, (layer, rows) in zip(colors, layers.groupby("layer"), strict=True):
            rows = rows.sort_values("step")
            ax.plot(rows["step"], rows[column], color=color, lw=1.2, label=f"layer {layer}")
            on_cls = rows[token].astype(str) == CLS
            ax.scatter(rows["step"][on_cls], rows[column][on_cls], s=22, color=color,
                       edgecolors="black", linewidths=0.5, zorder=4)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(title)
    axes[0].axhline(OUTPUT_RATIO, color="grey", ls="--", lw=0.8)
    axes[0].text(0, OUTPUT_RATIO, " probe threshold", va="bottom", fontsize=9, color="grey")
    axes[0].legend(fontsize=9, ncol=3, title="black edge: spike on <cls>", title_fontsize=9)
    weights = frame[frame["record"] == "weight"]
    ax = axes[2]
    for (_, row, col), rows in weights.groupby(["module", "row", "col"], sort=False):
        rows = rows.sort_values("step")
        first = rows["weight"].iloc[0]
        source = str(rows["source"].iloc[0])
        major = source == "super weight" or source.startswith("emerged")
        label = f"({rows['layer'].iloc[0]}, {row}, {col}) {source}" if major else None
        ax.plot(rows["step"], rows["weight"] / first if first else np.nan,
                lw=2 if major else 0.7, color=None if major else "0.6", label=label)  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlabel("training step")
    ax.set_title("tracked weights: value / first recorded value\n(grey: per-layer candidates)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
    for start, phase in _phase_starts(tables):
        for a in axes:
            a.axvline(start, color="black", ls=":", lw=0.8)
        axes[0].text(start, axes[0].get_ylim()[0], f" {phase}", va="bottom", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _phase_starts(tables: list[pd.DataFrame]) -> list[tuple[int, str]]:
    """Step at which each phase after the first begins on the joined axis, and its name."""
    starts, offset, seen = [], 0, False
    for table in tables:
        if table.empty:
            continue
        if seen:
            starts.append((offset, str(table["phase"].iloc[0])))
        seen, offset = True, offset + int(table["step"].max())
    return starts
