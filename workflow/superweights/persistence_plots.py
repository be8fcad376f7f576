"""Figure of the persistence table: each weight's value and effect before and after fine-tuning."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .outputs import save_figure  # noqa: E402

COLORS = {
    "persists": "tab:red",
    "lost in fine-tuning": "tab:orange",
    "appears in fine-tuning": "tab:blue",
    "not tested in the fine-tuned model": "tab:purple",
    "not tested in the starting model": "tab:cyan",
    "confirmed in neither": "0.5",
}


def plot_persistence(table: pd.DataFrame) -> Figure:
    """Left: weight in the starting vs the fine-tuned model; right: effect in each."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    panels = (
        ("weight_base", "weight_finetuned", "weight before fine-tuning", "weight after"),
        ("base_effect", "finetuned_effect",
         "drop of masked-expression log-lik. when pruned,\nstarting model (nats per cell)",
         "drop of log p(true type) when pruned,\nfine-tuned model (nats per cell)"),
    )  # fmt: skip
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels, strict=True):
        for status, part in table.groupby("status"):
            ax.scatter(part[x], part[y], color=COLORS.get(status, "k"), label=status, s=40)
            for r in part.itertuples():
                ax.annotate(r.candidate, (getattr(r, x), getattr(r, y)), fontsize=9,
                            xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.axhline(0, color="0.7", lw=0.8)
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if len(table):
        lo = float(min(table["weight_base"].min(), table["weight_finetuned"].min()))
        hi = float(max(table["weight_base"].max(), table["weight_finetuned"].max()))
        axes[0].plot([lo, hi], [lo, hi], color="0.3", ls="--", lw=0.8, label="unchanged")
    axes[0].legend(fontsize=9)
    fig.suptitle("super weights before and after fine-tuning")
    fig.tight_layout()
    return fig


def write_figure(table: pd.DataFrame, path: str | Path) -> Path:
    return save_figure(plot_persistence(table), Path(path), dpi=110)
