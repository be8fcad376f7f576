"""The quantization table: its columns and arms, and the arms compared per block size.

Free of torch and matplotlib, so that the report can read the table.
"""

import pandas as pd

ARMS = ("naive", "clip", "clip_restore")
"""Weight-quantization arms of Yu et al. (2024, Tables 3-4), as `method` in the table."""
ARM_LABELS = {"naive": "naive", "clip": "clip only", "clip_restore": "clip + restore SW"}
MEASURES = ("mean_log_likelihood", "accuracy", "macro_f1", "weight_error")
COLUMNS = (
    "scheme",
    "method",
    "bits",
    "block_size",
    "clip_value",
    "activation_scale",
    *MEASURES,
    "n_cells",
    "n_super_weights",
    "n_clipped",
)


def compare_arms(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per bits × block size of a `run_quantization` table: accuracy, mean log
    p(true type) and weight error of each arm (columns ``<measure>_<arm>``), each clip arm
    at its best clip value by mean log p(true type) (``clip_value_<arm>``)."""
    weight = frame[frame["scheme"] == "weight"]
    rows = []
    for (bits, block), group in weight.groupby(["bits", "block_size"], sort=False):
        row = {"bits": bits, "block_size": block}
        for arm in ARMS:
            part = group[group["method"] == arm]
            if part.empty:
                continue
            best = part.loc[part["mean_log_likelihood"].idxmax()]
            for measure_ in ("accuracy", "mean_log_likelihood", "weight_error"):
                row[f"{measure_}_{arm}"] = best[measure_]
            if arm != "naive":
                row[f"clip_value_{arm}"] = best["clip_value"]
        rows.append(row)
    return pd.DataFrame(rows)
