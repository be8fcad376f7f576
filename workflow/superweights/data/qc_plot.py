"""Figure of the preprocessing QC: cells kept per step and cells per type and split."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..outputs import save_figure  # noqa: E402


def plot_qc(qc: pd.DataFrame, path) -> None:
    """Two panels: the QC funnel and the composition of the train/val/test splits."""
    funnel = qc[
        qc["step"].isin(
            ["input", "qc_flag", "min_genes", "max_mito_fraction", "cell_types_and_caps"]
        )
    ]
    comp = qc[qc["step"].str.startswith("split_")].copy()
    comp["split"] = comp["step"].str.removeprefix("split_")
    table = comp.pivot(index="group", columns="split", values="count").fillna(0)
    table = table[[s for s in ("train", "val", "test") if s in table.columns]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[1, 2])
    ax1.barh(funnel["step"][::-1], funnel["count"][::-1], color="#4c72b0")
    ax1.set_xlabel("cells")
    ax1.set_title("Cells kept at each step")
    table.plot.bar(stacked=True, ax=ax2, color=["#4c72b0", "#dd8452", "#55a868"])
    ax2.set_ylabel("cells")
    ax2.set_xlabel("")
    ax2.set_title("Cells per type and split (split by donor)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
