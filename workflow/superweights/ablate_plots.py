"""Figures of the pruning test, drawn from its tables (`superweights.ablate` outputs).

Each `plot_*` function takes the tables it needs (as returned by `run_ablation` or read
back from the TSV files) and returns a matplotlib Figure; `write_figures` saves all four.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .outputs import save_figure  # noqa: E402

FIGURES = ("ll_by_condition", "scaling", "prediction_shift", "celltype_collapse")
_LL = "mean log p(true cell type)"
_CONTROL_LABELS = {
    "random": "random weights\n(same matrix)",
    "same_row": "same row,\nother columns",
    "same_col": "same column,\nother rows",
    "restore_all": "pruned, activation\nrestored (all tokens)",
    "restore_spike": "pruned, activation\nrestored (spike token)",
}


def plot_conditions(collapse: pd.DataFrame, controls: pd.DataFrame) -> Figure:
    """Per candidate: log-likelihood when pruned, under each control (mean +- sd), original."""
    candidates = list(dict.fromkeys(controls["candidate"]))
    original = float(collapse.loc[collapse["kind"] == "original", "log_likelihood"].iloc[0])
    together = collapse[collapse["kind"] == "prune_all"]
    n_bars = 2 + len(controls) // max(len(candidates), 1) + len(together)
    fig, axes = plt.subplots(
        len(candidates), 1, figsize=(8, (0.9 + 0.32 * n_bars) * len(candidates)), squeeze=False
    )
    for ax, cand in zip(axes[:, 0], candidates, strict=True):
        pruned = collapse[(collapse["kind"] == "prune") & (collapse["candidate"] == cand)]
        bars = [("original", original, 0.0, "0.6")]
        bars.append((f"{cand} pruned", float(pruned["log_likelihood"].iloc[0]), 0.0, "tab:red"))
        for r in controls[controls["candidate"] == cand].itertuples():
            label = _CONTROL_LABELS.get(r.control, f"{r.control} pruned (candidates kept)")
            sd = 0.0 if np.isnan(r.log_likelihood_sd) else r.log_likelihood_sd
            color = "tab:green" if r.control.startswith("restore") else "tab:blue"
            bars.append((label, r.log_likelihood_mean, sd, color))
        for r in together.itertuples():
            bars.append(("all accepted pruned", r.log_likelihood, 0.0, "tab:purple"))
        labels, means, errors, colors = zip(*bars, strict=True)
        y = np.arange(len(bars))[::-1]
        ax.barh(y, means, xerr=errors, color=colors, capsize=3)
        ax.axvline(original, color="0.3", lw=0.8, ls="--")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel(_LL)
        ax.set_title(f"candidate {cand} pruned vs controls (error bars: sd over draws)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_scaling(scaling: pd.DataFrame, original_ll: float) -> Figure:
    """Log-likelihood against the factor each candidate is multiplied by."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for cand, part in scaling.groupby("candidate", sort=False):
        part = part.sort_values("factor")
        ax.plot(part["factor"], part["log_likelihood"], marker="o", label=cand)
    ax.axhline(original_ll, color="0.3", lw=0.8, ls="--", label="original")
    ax.set_xlabel("super-weight scaling factor")
    ax.set_ylabel(_LL)
    ax.legend(fontsize=8)
    ax.set_title("scaling the candidate weight")
    fig.tight_layout()
    return fig


def plot_shift(shift: pd.DataFrame) -> Figure:
    """log2(pruned / original) mean predicted probability of each class, per pruning."""
    classes = shift[(shift["what"] == "class") & shift["kind"].isin(["prune", "prune_all"])]
    conditions = list(dict.fromkeys(classes["condition"])) or ["no pruning condition"]
    n_classes = max(classes["name"].nunique(), 1)
    fig, axes = plt.subplots(
        1, len(conditions), figsize=(4.5 * len(conditions), 1.2 + 0.28 * n_classes), squeeze=False
    )
    for ax, condition in zip(axes[0], conditions, strict=True):
        part = classes[classes["condition"] == condition]
        change = np.log2(part["pruned"].clip(lower=1e-12) / part["original"].clip(lower=1e-12))
        y = np.arange(len(part))[::-1]
        ax.barh(y, change, color=np.where(change > 0, "tab:red", "tab:blue"))
        ax.set_yticks(y, part["name"], fontsize=7)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_xlabel("log2 mean predicted probability,\npruned / original", fontsize=8)
        ax.set_title(condition, fontsize=9)
    fig.tight_layout()
    return fig


def plot_celltype_heatmap(strata: pd.DataFrame) -> Figure:
    """Drop of mean log p(true type) per condition (rows) and cell type (columns)."""
    kinds = ["prune", "prune_all", "restore_all", "restore_spike", "topk"]
    part = strata[(strata["stratum"] == "cell type") & strata["kind"].isin(kinds)]
    table = part.pivot_table(index="condition", columns="value", values="collapse")
    table = table.reindex(index=list(dict.fromkeys(part["condition"])))
    fig, ax = plt.subplots(
        figsize=(5 + 0.4 * max(table.shape[1], 1), 1.6 + 0.3 * max(table.shape[0], 1))
    )
    limit = float(np.nanmax(np.abs(table.to_numpy()))) if table.size else 1.0
    image = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(np.arange(table.shape[1]), table.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(table.shape[0]), table.index, fontsize=7)
    fig.colorbar(image, ax=ax, label="collapse (nats)")
    ax.set_title("collapse per cell type", fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(result, out_dir: str | Path) -> list[Path]:
    """Save the four figures of an `AblationResult` as PNG files (atomically) in `out_dir`."""
    out = Path(out_dir)
    original = float(
        result.collapse.loc[result.collapse["kind"] == "original", "log_likelihood"].iloc[0]
    )
    figures = {
        "ll_by_condition": plot_conditions(result.collapse, result.controls),
        "scaling": plot_scaling(result.scaling, original),
        "prediction_shift": plot_shift(result.shift),
        "celltype_collapse": plot_celltype_heatmap(result.strata),
    }
    return [save_figure(figures[name], out / f"{name}.png", dpi=120) for name in FIGURES]
