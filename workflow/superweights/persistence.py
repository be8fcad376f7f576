"""Do super weights survive fine-tuning? Every super weight of either model, side by side.

The starting checkpoint (released, or pretrained here) is probed and confirmed with its own
objective, the masked-expression log-likelihood of each cell; the fine-tuned classifier with
log p(true cell type). This stage takes the weights either confirmation tested, reads each
one's value in both models, and measures its effect in both (mean score drop when pruned,
with a bootstrap CI over donors) on the same held-out cells. The verdicts (confirmed or
not) come from each model's own confirmation, with its null; a weight one model never
tested is marked so, not judged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .ablate import AblateSettings
from .confirm import candidate_id, weight_effects
from .editing import read_candidates
from .model.finetuned import load_test_cells
from .scores import CellTypeScore, MaskedExpressionScore

COLUMNS = [
    "candidate", "module", "layer", "row", "col", "status", "tested_in_base",
    "confirmed_in_base", "tested_in_finetuned", "confirmed_in_finetuned", "weight_base",
    "weight_finetuned", "relative_change", "base_effect", "base_ci_low", "base_ci_high",
    "finetuned_effect", "finetuned_ci_low", "finetuned_ci_high",
]  # fmt: skip
STATUS = {
    (True, True): "persists",
    (True, False): "lost in fine-tuning",
    (False, True): "appears in fine-tuning",
    (False, False): "confirmed in neither",
}


def persistence(
    tokenised,
    base_checkpoint: str | Path,
    finetuned_checkpoint: str | Path,
    base_confirmed,
    finetuned_confirmed,
    settings: AblateSettings,
    device=None,
) -> pd.DataFrame:
    """One row per weight tested in either model: values, effects and verdicts in both."""
    tables = {
        "base": read_candidates(base_confirmed),
        "finetuned": read_candidates(finetuned_confirmed),
    }
    union = pd.concat([t[["module", "row", "col"]] for t in tables.values()], ignore_index=True)
    union = union.drop_duplicates(ignore_index=True)
    cells = dict(batch_size=settings.batch_size, max_seq_len=settings.max_seq_len,
                 seed=settings.seed, max_cells=settings.max_cells, device=device,
                 split=settings.split)  # fmt: skip
    base = load_test_cells(tokenised, base_checkpoint, labelled=False, **cells)
    tuned = load_test_cells(tokenised, finetuned_checkpoint, labelled=True, **cells)
    effects = {
        "base": weight_effects(
            base.model, union,
            MaskedExpressionScore(base.model, base.batches, settings.mask_ratio, settings.seed),
            groups=base.obs["donor"].astype(str).to_numpy(), settings=settings.confirm_settings(),
        ),
        "finetuned": weight_effects(
            tuned.model, union, CellTypeScore(tuned.model, tuned.batches),
            groups=tuned.obs["donor"].astype(str).to_numpy(), settings=settings.confirm_settings(),
        ),
    }  # fmt: skip
    rows = []
    for i, w in enumerate(union.itertuples(index=False)):
        row = {"module": w.module, "row": w.row, "col": w.col}
        for name, table in tables.items():
            own = table[(table["module"] == w.module) & (table["row"] == w.row)
                        & (table["col"] == w.col)]  # fmt: skip
            confirmed = bool(own["confirmed"].astype(str).str.lower().eq("true").any())
            row[f"tested_in_{name}"] = len(own) > 0
            row[f"confirmed_in_{name}"] = confirmed
            e = effects[name].iloc[i]
            row |= {f"weight_{name}": e.weight, f"{name}_effect": e.effect,
                    f"{name}_ci_low": e.ci_low, f"{name}_ci_high": e.ci_high}  # fmt: skip
        row["layer"] = effects["base"].iloc[i].layer
        row["candidate"] = candidate_id(row["layer"], w.row, w.col)
        before = row["weight_base"]
        row["relative_change"] = (
            (row["weight_finetuned"] - before) / abs(before) if before else np.nan
        )
        row["status"] = STATUS[(row["confirmed_in_base"], row["confirmed_in_finetuned"])]
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
