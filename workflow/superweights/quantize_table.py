"""The quantization table: its columns and arms, and the arms compared per block size.

Free of torch and matplotlib, so that the report can read the table.
"""

import pandas as pd

ARMS = ("naive", "clip", "clip_restore", "clip_control")
"""Weight-quantization arms of Yu et al. (2024, Tables 3-4), as `method` in the table, and
a control: clip, then restore the largest other weight of each super weight's matrix."""
ARM_LABELS = {"naive": "naive", "clip": "clip only", "clip_restore": "clip + restore SW",
              "clip_control": "clip + restore control"}  # fmt: skip
MEASURES = ("mean_log_likelihood", "accuracy", "macro_f1", "weight_error")
COLUMNS = (
    "scheme",
    "method",
    "bits",
    "block_size",
    "clip_value",
    "activation_scale",
    *MEASURES,
    "selection_log_likelihood",
    "n_cells",
    "n_super_weights",
    "n_clipped",
)


CONTRAST_COLUMNS = ("scheme", "bits", "block_size", "contrast", "clip_value", "measure",
                    "difference", "ci_low", "ci_high", "n_cells", "n_donors")  # fmt: skip
CONTRASTS = {
    "restore vs clip": ("clip_restore", "clip"),
    "restore vs control": ("clip_restore", "clip_control"),
    "restore vs naive": ("clip_restore", "naive"),
}
"""Weight-quantization contrasts: (arm, minus arm), each clip arm at its chosen clip value."""


def compare_arms(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per bits × block size of a `run_quantization` table: accuracy, mean log
    p(true type) and weight error of each arm (columns ``<measure>_<arm>``), each clip arm
    at the clip value chosen on the selection cells (highest `selection_log_likelihood`;
    by the evaluation cells' own log p for tables without it) (``clip_value_<arm>``)."""
    weight = frame[frame["scheme"] == "weight"]
    rows = []
    for (bits, block), group in weight.groupby(["bits", "block_size"], sort=False):
        row = {"bits": bits, "block_size": block}
        for arm in ARMS:
            part = group[group["method"] == arm]
            if part.empty:
                continue
            best = part.loc[_chosen(part)]
            for measure_ in ("accuracy", "mean_log_likelihood", "weight_error"):
                row[f"{measure_}_{arm}"] = best[measure_]
            if arm != "naive":
                row[f"clip_value_{arm}"] = best["clip_value"]
        rows.append(row)
    return pd.DataFrame(rows)


def _chosen(part: pd.DataFrame):
    """Index of the row with the best selection log p (evaluation log p where absent)."""
    key = "selection_log_likelihood"
    if key in part and part[key].notna().any():
        return part[key].idxmax()
    return part["mean_log_likelihood"].idxmax()
