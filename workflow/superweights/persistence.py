"""Do super weights survive fine-tuning? Every super weight of either model, side by side.

The starting checkpoint (released, or pretrained here) is probed and confirmed with its own
objective, the masked-expression log-likelihood of each cell; the fine-tuned classifier with
log p(true cell type). This stage takes the weights either confirmation tested, reads each
one's value in both models, and measures its effect in both (mean score drop when pruned,
with a bootstrap CI over donors) on the same held-out cells. The verdicts (confirmed or
not) come from each model's own confirmation, with its null; a weight one model never
tested is marked "not tested in ...", not judged. Persistence is also judged by the
activation, as Yu et al. compare base and instruct models: whether each model's probe
accepted a massive activation made by this weight (same layer, output and input channel;
`massive_in_base`, `massive_in_finetuned`, `activation_status`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .ablate import AblateSettings
from .confirm import candidate_id, weight_effects
from .editing import read_candidates
from .model.finetuned import load_test_cells
from .model.spikes import read_spikes
from .outputs import named_paths, write_tsv
from .scores import CellTypeScore, MaskedExpressionScore

COLUMNS = [
    "candidate", "module", "layer", "row", "col", "status", "activation_status",
    "tested_in_base", "confirmed_in_base", "tier_in_base", "massive_in_base",
    "tested_in_finetuned", "confirmed_in_finetuned", "tier_in_finetuned",
    "massive_in_finetuned", "weight_base",
    "weight_finetuned", "relative_change", "base_effect", "base_ci_low", "base_ci_high",
    "finetuned_effect", "finetuned_ci_low", "finetuned_ci_high",
]  # fmt: skip
OUTPUT_FILES = {
    "table": "persistence.tsv",
    "figure": "persistence.png",
    "spikes_figure": "spikes_over_training.png",
}
ACTIVATION_STATUS = {
    (True, True): "spikes in both",
    (True, False): "spikes only before fine-tuning",
    (False, True): "spikes only after fine-tuning",
    (False, False): "spikes in neither",
}


def status(tested_base: bool, confirmed_base: bool, tested_tuned: bool, confirmed_tuned: bool):
    """The weight's fate through fine-tuning, judged only where both models tested it."""
    if confirmed_base and confirmed_tuned:
        return "persists"
    if confirmed_base:
        return "lost in fine-tuning" if tested_tuned else "not tested in the fine-tuned model"
    if confirmed_tuned:
        return "appears in fine-tuning" if tested_base else "not tested in the starting model"
    return "confirmed in neither"


def persistence(
    tokenised,
    base_checkpoint: str | Path,
    finetuned_checkpoint: str | Path,
    base_confirmed,
    finetuned_confirmed,
    settings: AblateSettings,
    device=None,
    base_candidates=None,
    finetuned_candidates=None,
) -> pd.DataFrame:
    """One row per weight tested in either model: values, effects and verdicts in both.

    `*_candidates`: each model's probe candidates (candidates.tsv): a weight is `massive`
    in a model where that probe accepted it; without them it counts as not massive."""
    tables = {
        "base": read_candidates(base_confirmed),
        "finetuned": read_candidates(finetuned_confirmed),
    }
    union = pd.concat([t[["module", "row", "col"]] for t in tables.values()], ignore_index=True)
    union = union.drop_duplicates(ignore_index=True)
    massive = {"base": _accepted(base_candidates), "finetuned": _accepted(finetuned_candidates)}
    cells = dict(batch_size=settings.batch_size, seed=settings.seed, max_cells=settings.max_cells,
                 device=device, split=settings.split)  # fmt: skip
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
            tiers = own["tier"].astype(str) if "tier" in own else pd.Series(dtype=str)
            row[f"tier_in_{name}"] = tiers.iloc[0] if len(tiers) else "not tested"
            row[f"massive_in_{name}"] = (w.module, w.row, w.col) in massive[name]
            e = effects[name].iloc[i]
            row |= {f"weight_{name}": e.weight, f"{name}_effect": e.effect,
                    f"{name}_ci_low": e.ci_low, f"{name}_ci_high": e.ci_high}  # fmt: skip
        row["layer"] = effects["base"].iloc[i].layer
        row["candidate"] = candidate_id(row["layer"], w.row, w.col)
        before = row["weight_base"]
        row["relative_change"] = (
            (row["weight_finetuned"] - before) / abs(before) if before else np.nan
        )
        row["status"] = status(
            row["tested_in_base"],
            row["confirmed_in_base"],
            row["tested_in_finetuned"],
            row["confirmed_in_finetuned"],
        )
        row["activation_status"] = ACTIVATION_STATUS[
            (row["massive_in_base"], row["massive_in_finetuned"])
        ]  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _accepted(candidates) -> set[tuple[str, int, int]]:
    """(module, row, col) of the weights a probe accepted (none without a table)."""
    if candidates is None:
        return set()
    table = read_candidates(candidates)
    table = table[table["accepted"]]
    return set(zip(table["module"], table["row"].astype(int), table["col"].astype(int),
                   strict=True))  # fmt: skip


def run(inputs, outputs, settings: AblateSettings) -> pd.DataFrame:
    """The persistence stage: the `persistence` table of the starting (`inputs["base"]`) and
    the fine-tuned (`inputs["finetuned"]`) checkpoint on `inputs["data"]`, from their
    confirmations (`base_confirmed`, `finetuned_confirmed`) and, where given, probes
    (`base_candidates`, `finetuned_candidates`); write it, its figure and the figure of the
    training phases' spike tables (`spikes`, in order) to `outputs` (`OUTPUT_FILES`).
    """
    from .model.spikes_plots import plot_spikes
    from .persistence_plots import write_figure

    paths = named_paths(outputs, OUTPUT_FILES)
    table = persistence(
        inputs["data"],
        inputs["base"],
        inputs["finetuned"],
        inputs["base_confirmed"],
        inputs["finetuned_confirmed"],
        settings,
        base_candidates=inputs.get("base_candidates"),
        finetuned_candidates=inputs.get("finetuned_candidates"),
    )
    write_tsv(paths["table"], table)
    write_figure(table, paths["figure"])
    spikes = [read_spikes(path) for path in inputs.get("spikes") or []]
    plot_spikes(spikes, paths["spikes_figure"])
    return table
