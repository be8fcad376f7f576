"""Figures of a training run: confusion matrix and learning curves (PNG, Agg backend)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..outputs import save_figure  # noqa: E402


def plot_confusion(metrics: dict, path: str | Path) -> Path:
    """Row-normalised confusion matrix (true class x predicted class) from metrics.json."""
    classes = metrics["classes"]
    counts = np.asarray(metrics["confusion"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted cell type")
    ax.set_ylabel("true cell type")
    if len(classes) <= 25:
        for (i, j), share in np.ndenumerate(shares):
            if counts[i, j]:
                colour = "white" if share > 0.6 else "black"
                ax.text(j, i, f"{share:.2f}", ha="center", va="center", fontsize=9, color=colour)
    ax.set_title(
        f"test cells: accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_training_curves(history, path: str | Path) -> Path:
    """Train and validation loss per epoch, and validation accuracy when recorded.

    `history`: the rows of history.tsv (a DataFrame or a list of dicts).
    """
    frame = pd.DataFrame(history)
    with_accuracy = "val_accuracy" in frame and frame["val_accuracy"].notna().any()
    fig, axes = plt.subplots(1, 1 + with_accuracy, figsize=(5 + 4 * with_accuracy, 3.5))
    axes = np.atleast_1d(axes)
    axes[0].plot(frame["epoch"], frame["train_loss"], "o-", label="train")
    axes[0].plot(frame["epoch"], frame["val_loss"], "s-", label="validation")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    if with_accuracy:
        axes[1].plot(frame["epoch"], frame["val_accuracy"], "s-", color="tab:green")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("validation accuracy")
        axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xticks(frame["epoch"])
    fig.tight_layout()
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
