"""Figure of the quantization stage: each measure against block size per arm, and W8A8."""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .outputs import named_paths, save_figure
from .quantize_table import ARM_LABELS, ARMS, compare_arms

LABELS = {
    "accuracy": "accuracy",
    "mean_log_likelihood": "mean log p(true cell type)",
    "weight_error": "relative weight error ‖W−Q‖/‖W‖",
}
ARM_STYLES = {"naive": "o-", "clip": "s--", "clip_restore": "^-", "clip_control": "v:"}


def _positions(blocks: list[str]) -> dict[str, float]:
    """x position of each block-size label; "tensor" sits right of the largest size."""
    sizes = sorted({int(b) for b in blocks if b != "tensor"})
    positions = {str(s): float(s) for s in sizes}
    if "tensor" in blocks:
        positions["tensor"] = 4.0 * sizes[-1] if sizes else 1.0
    return positions


def _w8a8_row(axes, frame: pd.DataFrame, fp32: pd.DataFrame) -> None:
    """W8A8 naive and with the super activation held out, as changes from fp32 (absolute
    bars of values that differ in the third decimal would hide the difference)."""
    w8a8 = frame[frame["scheme"] == "w8a8"]
    names = [f"W8A8 {m}" for m in w8a8["method"]]
    colours = ["tab:blue", "tab:green", "tab:orange"][: len(names)]
    for ax, (measure, label) in zip(axes, LABELS.items(), strict=True):
        base = float(fp32[measure].iloc[0]) if len(fp32) else 0.0
        change = np.round(w8a8[measure].to_numpy(dtype=float) - base, 12)  # no float dust
        ax.bar(names, change, color=colours)
        for x, v in enumerate(change):
            ax.annotate(f"{v:+.3g}", (x, v), ha="center", va="bottom" if v >= 0 else "top",
                        fontsize=9)  # fmt: skip
        ax.axhline(0, color="grey", lw=1)
        low, high = min(change.min(initial=0), 0), max(change.max(initial=0), 0)
        span = max(high - low, 1e-3 * max(abs(base), 1e-6))  # no change: a readable scale
        ax.set_ylim(low - 0.3 * span, high + 0.3 * span)
        ax.set_ylabel(f"{label}\nminus fp32" if len(fp32) else label)
        ax.tick_params(axis="x", labelsize=9)


def write_figures(frame: pd.DataFrame, outputs) -> Path:
    """Save the figure of a `run_quantization` table as `quantize.png`, atomically.

    `outputs`: a folder or the rule's named outputs with `figure` (`named_paths`).
    """
    path = named_paths(outputs, {"figure": "quantize.png"})["figure"]
    return save_figure(plot_quantization(frame), path, dpi=120)


def plot_quantization(frame: pd.DataFrame) -> Figure:
    """One row per bit width and one for W8A8, one column per measure."""
    arms = compare_arms(frame.astype({"block_size": str}))
    fp32 = frame[frame["scheme"] == "fp32"]
    has_w8a8 = bool((frame["scheme"] == "w8a8").any())
    bits = sorted(arms["bits"].unique(), reverse=True) if len(arms) else []
    n_rows = max(len(bits) + has_w8a8, 1)
    fig = Figure(figsize=(11, 3.4 * n_rows), layout="tight")  # labels legible at report width
    axes = fig.subplots(n_rows, len(LABELS), squeeze=False)
    positions = _positions(list(arms["block_size"].unique())) if len(arms) else {}
    for row, b in zip(axes, bits, strict=False):
        part = arms[arms["bits"] == b]
        x = part["block_size"].map(positions)
        for ax, (measure, label) in zip(row, LABELS.items(), strict=True):
            for arm in ARMS:
                column = f"{measure}_{arm}"
                if column in part:
                    ax.plot(x, part[column], ARM_STYLES[arm], label=f"INT{b} {ARM_LABELS[arm]}")
            if not fp32.empty:
                ax.axhline(fp32[measure].iloc[0], color="grey", lw=1, label="fp32")
            ax.set_xscale("log")
            ax.set_xticks(list(positions.values()), list(positions), rotation=45)
            ax.minorticks_off()
            ax.set_xlabel("block size (weights)")
            ax.set_ylabel(label)
        row[0].legend(fontsize=9)
    if has_w8a8:
        _w8a8_row(axes[-1], frame, fp32)
    return fig
