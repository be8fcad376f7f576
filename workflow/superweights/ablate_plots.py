"""Figures of the pruning test, drawn from its tables (`superweights.ablate` outputs).

Each `plot_*` function takes the tables it needs (as returned by `run_ablation` or read
back from the TSV files) and returns a matplotlib Figure; `write_figures` saves them all.
Figures are drawn at full report width with labels of at least 9 pt.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .outputs import named_paths, save_figure  # noqa: E402

FIGURE_FILES = {
    "forest": "forest.png",
    "null_histograms": "null_histograms.png",
    "scaling_figure": "scaling.png",
    "prediction_shift": "prediction_shift.png",
    "celltype_effect": "celltype_effect.png",
}
"""Figures by output name (the rule's) -> file name in the stage folder."""
_EFFECT = "mean drop of log p(true cell type) when pruned (nats per cell)"
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10})


TIER_COLORS = {"super weight": "tab:red", "important weight": "tab:orange"}
"""Marker colour per verdict tier; `not confirmed` is grey."""


def plot_forest(confirmed: pd.DataFrame) -> Figure:
    """Each candidate's effect with its CI, beside both nulls' 95th percentiles and top-k,
    labelled with its tier."""
    n = max(len(confirmed), 1)
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.55 * n))
    y = np.arange(len(confirmed))[::-1]
    for yi, r in zip(y, confirmed.itertuples(), strict=True):
        ax.plot([r.null_mean, r.null_q95], [yi, yi], color="0.75", lw=8, solid_capstyle="butt")
        ax.plot(r.contribution_null_q95, yi, marker="|", color="tab:purple", ms=14, mew=2)
        color = TIER_COLORS.get(r.tier, "0.3")
        err = [[r.effect - r.ci_low], [r.ci_high - r.effect]]
        ax.errorbar(r.effect, yi, xerr=err, fmt="o", color=color, capsize=4)
        ax.plot(r.topk_effect, yi, marker="|", color="tab:blue", ms=14, mew=2)
    ax.set_yticks(y, [f"{c} ({tier})" for c, tier in
                      zip(confirmed["candidate"], confirmed["tier"], strict=True)])  # fmt: skip
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_xlabel(_EFFECT)
    ax.set_title(
        "effect ± 95% CI (donor bootstrap); grey band: magnitude-matched null mean to 95th "
        "percentile;\npurple tick: contribution-matched null's 95th percentile; blue tick: "
        "top-k control",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_null_histograms(confirmed: pd.DataFrame, nulls: pd.DataFrame) -> Figure:
    """Per candidate: both nulls' effects as histograms, the candidate's effect marked."""
    n = max(len(confirmed), 1)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), squeeze=False)
    for ax, r in zip(axes[:, 0], confirmed.itertuples(), strict=False):
        own = nulls[nulls["candidate"] == r.candidate]
        for kind, color in (("magnitude", "0.6"), ("contribution", "tab:purple")):
            null = own.loc[own["kind"] == kind, "effect"]
            ax.hist(null, bins=30, color=color, alpha=0.6,
                    label=f"{len(null)} {kind}-matched null weights")  # fmt: skip
        ax.axvline(r.effect, color="tab:red", lw=2, label=f"{r.candidate}: {r.effect:.3g}")
        ax.set_title(
            f"{r.candidate} ({r.tier}): p = {r.p_value:.3g}, q = {r.q_value:.3g} (magnitude); "
            f"p = {r.p_contribution:.3g}, q = {r.q_contribution:.3g} (contribution)",
            fontsize=10,
        )
        ax.set_xlabel(_EFFECT)
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def plot_scaling(scaling: pd.DataFrame) -> Figure:
    """Drop of log p(true type) against the factor each candidate is multiplied by."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for cand, part in scaling.groupby("candidate", sort=False):
        part = part.sort_values("factor")
        ax.plot(part["factor"], part["effect"], marker="o", label=cand)
    ax.axhline(0, color="0.3", lw=0.8, ls="--")
    ax.set_xlabel("factor the candidate weight is multiplied by (1 = unchanged)")
    ax.set_ylabel("mean drop of log p(true type)")
    ax.legend()
    ax.set_title("scaling the candidate weight")
    fig.tight_layout()
    return fig


def plot_shift(shift: pd.DataFrame) -> Figure:
    """log2(pruned / original) mean predicted probability of each class, per candidate."""
    candidates = list(dict.fromkeys(shift["candidate"])) or ["no candidate"]
    n_classes = max(shift["class"].nunique(), 1)
    fig, axes = plt.subplots(
        1, len(candidates), figsize=(10, 1.5 + 0.32 * n_classes), squeeze=False
    )
    for ax, cand in zip(axes[0], candidates, strict=True):
        part = shift[shift["candidate"] == cand]
        change = np.log2(part["pruned"].clip(lower=1e-12) / part["original"].clip(lower=1e-12))
        y = np.arange(len(part))[::-1]
        ax.barh(y, change, color=np.where(change > 0, "tab:red", "tab:blue"))
        ax.set_yticks(y, part["class"])
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_title(f"{cand} pruned")
    fig.supxlabel("log2 of each cell type's mean predicted probability, pruned / original")
    fig.tight_layout()
    return fig


def plot_celltype_heatmap(strata: pd.DataFrame) -> Figure:
    """Effect per cell type (rows) and candidate (columns), each value written in its cell;
    cell types with too few donors are marked, not coloured."""
    part = strata[strata["stratum"] == "cell type"]
    table = part.pivot_table(
        index="value", columns="candidate", values="effect", sort=False, dropna=False
    )
    n_types, n_candidates = max(table.shape[0], 1), max(table.shape[1], 1)
    fig, ax = plt.subplots(figsize=(min(10, 3.5 + 2.2 * n_candidates), 1.6 + 0.36 * n_types))
    values = table.to_numpy(dtype=float)
    finite = np.isfinite(values)
    limit = float(np.abs(values[finite]).max()) if finite.any() else 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        dark = np.isfinite(v) and abs(v) > 0.6 * limit
        text = f"{v:.2g}" if np.isfinite(v) else "too few donors"
        ax.text(j, i, text, ha="center", va="center", fontsize=9,
                color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(np.arange(table.shape[1]), table.columns)
    ax.set_yticks(np.arange(table.shape[0]), table.index)
    fig.colorbar(image, ax=ax, label="mean drop of log p(true type) (nats)")
    ax.set_title("effect of pruning each candidate, per cell type")
    fig.tight_layout()
    return fig


def write_figures(result, outputs) -> list[Path]:
    """Save the figures of an `AblationResult` (a folder or the rule's named outputs)."""
    figures = {
        "forest": lambda: plot_forest(result.confirmed),
        "null_histograms": lambda: plot_null_histograms(result.confirmed, result.nulls),
        "scaling_figure": lambda: plot_scaling(result.scaling),
        "prediction_shift": lambda: plot_shift(result.shift),
        "celltype_effect": lambda: plot_celltype_heatmap(result.strata),
    }
    paths = named_paths(outputs, FIGURE_FILES)
    return [save_figure(figures[name](), paths[name], dpi=110) for name in FIGURE_FILES]
