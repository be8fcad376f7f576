"""Confirm super-weight candidates of a fine-tuned scGPT classifier on held-out donors.

The verdicts come from the model-agnostic core (`confirm_super_weights`) with the
classifier's objective as the score: log p(true cell type) of each evaluation cell, and
donors as the groups of the bootstrap. The probe selects candidates on other cells
(validation by default), so selection and evaluation never share cells unless the
configuration says so, and then the summary says it too. Beside the verdicts, this stage
writes what a reader asks next: the effect of scaling each candidate (Yu et al.'s sweep),
the shift of predicted class probabilities, the effect per cell type and per AD stratum
(strata with fewer than `min_donors` test donors are marked, not compared), and each
cell's own effect. `cells.h5ad` holds, per evaluated cell, its `<cls>` embedding
(`obsm["X_cls"]`), metadata, each candidate's effect (`obs["effect <candidate>"]`) and the
per-cell effects of up to `CELL_NULLS` of its null weights (`obsm["null <candidate>"]`), for
the cell map and the gene–effect association (`cell_map`).

Expression measures (masked-expression log-likelihood) are reported only when the
expression decoder was trained together with the encoder under test
(`expression_trained`, i.e. fine-tuning with `mlm_weight` > 0); otherwise the decoder is
stale and the summary says why they are left out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .confirm import (
    PAPER_TOPK_FRACTION,
    Confirmation,
    ConfirmSettings,
    candidate_id,
    confirm_super_weights,
)
from .editing import WeightEdit, check_candidate, edited_weights, layer_of, read_candidates
from .errors import UserError
from .model.checkpoint import checkpoint_config, read_args_and_vocab
from .model.finetuned import load_test_cells
from .model.scgpt import ScGPTModel
from .model.train import class_names, read_tokenised
from .outputs import named_paths, write_h5ad, write_json, write_tsv
from .scores import PRECISIONS, CellTypeScore, MaskedExpressionScore

log = logging.getLogger(__name__)

CELL_TYPE = "cell type"
SPLITS = ("train", "val", "test")
CELL_NULLS = 99
"""Null weights per candidate whose per-cell effects go to cells.h5ad (the first draws)."""


@dataclass
class AblateSettings:
    """Cells, null, thresholds and extra tables of the pruning test.

    `n_null`, `alpha`, `min_effect`, `band`, `topk_fraction`, `topk_sweep`, `min_recovery`,
    `n_boot`: see `ConfirmSettings`. `n_strongest`: candidates tested when the probe accepted none.
    `split`: cells evaluated (never those the probe selected on, by default). `min_donors`:
    strata with fewer test donors are reported as too few, not compared. `scales`: the
    factors of the scaling sweep. `expression_trained`: the expression decoder was trained
    with the encoder (fine-tuning `mlm_weight` > 0), so expression effects mean something.
    `precision`: how the stacked null draws run (`scores.PRECISIONS`; "fp32" is the
    reference, "tf32x3" keeps fp32 accuracy on GPU tensor cores).
    """

    n_null: int = 99
    alpha: float = 0.05
    min_effect: float = 0.01
    band: float = 2.0
    topk_fraction: float = PAPER_TOPK_FRACTION
    topk_sweep: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    min_recovery: float = 0.5
    n_boot: int = 1000
    n_strongest: int = 3
    split: str = "test"
    min_donors: int = 3
    scales: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0)
    strata_columns: tuple[str, ...] = ("Overall AD neuropathological Change", "Braak")
    expression_trained: bool = False
    mask_ratio: float = 0.15
    max_cells: int = 1000
    batch_size: int = 32
    max_seq_len: int = 256
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {list(PRECISIONS)}, not {self.precision!r}")
        self.topk_sweep = tuple(float(f) for f in self.topk_sweep)
        self.scales = tuple(float(s) for s in self.scales)
        self.strata_columns = tuple(self.strata_columns)
        self.confirm_settings()  # checks the shared keys
        if self.n_strongest < 1 or self.min_donors < 1:
            raise UserError(
                f"ablate needs n_strongest >= 1 and min_donors >= 1 "
                f"(got {self.n_strongest}, {self.min_donors})"
            )
        if self.split not in SPLITS:
            raise UserError(f"ablate split {self.split!r} is not one of {list(SPLITS)}")
        if not self.scales or not all(math.isfinite(s) for s in self.scales):
            raise UserError(f"scales must be a non-empty list of numbers, got {self.scales}")
        if not 0 < self.mask_ratio < 1:
            raise UserError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.max_cells < 1 or self.batch_size < 1 or self.max_seq_len < 2:
            raise UserError("max_cells and batch_size must be >= 1, max_seq_len >= 2")

    def confirm_settings(self) -> ConfirmSettings:
        """The confirmation core's settings: every field of ConfirmSettings this stage has."""
        shared = [f.name for f in fields(ConfirmSettings) if hasattr(self, f.name)]
        return ConfirmSettings(**{name: getattr(self, name) for name in shared})


@dataclass
class AblationResult:
    """Tables of one ablation run (see `write_outputs` for the files)."""

    confirmed: pd.DataFrame
    nulls: pd.DataFrame
    topk: pd.DataFrame
    scaling: pd.DataFrame
    shift: pd.DataFrame
    strata: pd.DataFrame
    cells: pd.DataFrame
    summary: dict
    cell_map: ad.AnnData


OUTPUT_TABLES = ("confirmed", "nulls", "topk", "scaling", "shift", "strata", "cells")
OUTPUT_FILES = {name: f"{name}.tsv" for name in OUTPUT_TABLES} | {
    "summary": "summary.json",
    "cells_h5ad": "cells.h5ad",
}


def select_targets(model: ScGPTModel, candidates: pd.DataFrame, n_strongest: int):
    """Accepted candidates, else the `n_strongest` first rows, else the largest down-proj |w|.

    Returns a table with module, row, col, weight, probe_accepted and source.
    """
    frame = candidates.drop_duplicates(["module", "row", "col"])
    accepted = frame[frame["accepted"]]
    if len(accepted):
        rows, source = accepted, "probe: accepted"
    elif len(frame):
        rows, source = frame.head(n_strongest), "probe: strongest spike, not accepted"
    else:
        log.warning("the candidates table is empty; testing the largest down-projection weights")
        return _largest_down_projection_weights(model, n_strongest)
    out = []
    for r in rows.itertuples(index=False):
        module, row, col = str(r.module), int(r.row), int(r.col)
        value = check_candidate(model, module, row, col, getattr(r, "weight", math.nan))
        accepted_flag = bool(r.accepted) and source == "probe: accepted"
        out.append((module, row, col, value, accepted_flag, source))
    return pd.DataFrame(out, columns=_TARGET_COLUMNS)


_TARGET_COLUMNS = ["module", "row", "col", "weight", "probe_accepted", "source"]


def _largest_down_projection_weights(model: ScGPTModel, n: int) -> pd.DataFrame:
    found = []
    for layer, linear in enumerate(model.down_projections()):
        w = linear.weight.detach()
        row, col = divmod(int(w.abs().argmax()), w.shape[1])
        module = f"transformer_encoder.layers.{layer}.linear2"
        source = "largest |w| of a down-projection (probe listed nothing)"
        found.append((module, row, col, float(w[row, col]), False, source))
    found.sort(key=lambda t: -abs(t[3]))
    return pd.DataFrame(found[:n], columns=_TARGET_COLUMNS)


def run_ablation(
    model: ScGPTModel,
    batches: list[dict[str, Tensor]],
    classes: list[str],
    candidates: pd.DataFrame,
    settings: AblateSettings,
    obs: pd.DataFrame,
) -> AblationResult:
    """Confirm the candidates on fixed batches (with "labels") of the cells in `obs` order.

    `obs` needs `donor` (the bootstrap's groups) and may hold the strata columns. The
    model's weights and mode are restored.
    """
    labels = torch.cat([b["labels"] for b in batches]).cpu().numpy()
    if len(obs) != len(labels):
        raise ValueError(f"obs has {len(obs)} rows for {len(labels)} cells")
    targets = select_targets(model, candidates, settings.n_strongest)
    score = CellTypeScore(model, batches, precision=settings.precision)
    donors = obs["donor"].astype(str).to_numpy()
    result = confirm_super_weights(
        model, targets.assign(accepted=targets["probe_accepted"]), score,
        settings=settings.confirm_settings(), groups=donors, progress=True,
    )  # fmt: skip
    confirmed = result.to_frame()
    confirmed.insert(6, "probe_accepted", targets["probe_accepted"].to_numpy())
    confirmed.insert(7, "source", targets["source"].to_numpy())
    for row in confirmed.itertuples():
        log.info("%s: %s", row.candidate, row.reason)
    n_donors = len(set(donors))
    summary = {
        "n_cells": len(labels),
        "n_donors": n_donors,
        "split": settings.split,
        "score": "log p(true cell type) per cell",
        "original_log_likelihood": float(result.base_scores.mean()),
        "original_accuracy": float((score.log_probs(model).argmax(1) == labels).mean()),
        "n_candidates": len(confirmed),
        "confirmed": result.confirmed,
        "super_weights": result.super_weights,
        "tiers": dict(zip(confirmed["candidate"], confirmed["tier"], strict=True)),
        "decisions": dict(zip(confirmed["candidate"], confirmed["reason"], strict=True)),
        "warning": result.warning,
        "settings": asdict(settings),
    }
    if n_donors < settings.min_donors:
        summary["donor_warning"] = (
            f"only {n_donors} donor(s) in the evaluated cells: confidence intervals over "
            f"donors are not meaningful below {settings.min_donors}"
        )
    with torch.no_grad():
        scaling = _scaling(model, score, targets, settings.scales)
        shift = _shift(model, score, targets, classes)
    if settings.expression_trained:
        expression = MaskedExpressionScore(model, batches, settings.mask_ratio, settings.seed)
        confirmed["expr_effect"] = [
            _mean_drop(model, expression, [_prune(t)]) for t in targets.itertuples()
        ]
        summary["expression"] = "masked-expression log-likelihood drop in expr_effect"
    else:
        summary["expression"] = (
            "expression measures omitted: the expression decoder was not trained with this "
            "encoder (fine-tuning mlm_weight is 0), so its predictions say nothing about it"
        )
    cells = _cells(result, obs, labels, classes)
    cell_map = _cell_map(model, score, obs, labels, classes, result, settings.strata_columns)
    return AblationResult(
        confirmed=confirmed,
        nulls=result.nulls,
        topk=result.topk,
        scaling=scaling,
        shift=shift,
        strata=_strata(cells, obs, settings),
        cells=cells,
        summary=summary,
        cell_map=cell_map,
    )


def _prune(t) -> WeightEdit:
    return WeightEdit.single(t.module, t.row, t.col)


def _mean_drop(model, score, edits: list[WeightEdit]) -> float:
    base = score(model)
    with edited_weights(model, edits):
        return float((base - score(model)).mean())


def _scaling(model, score: CellTypeScore, targets: pd.DataFrame, scales) -> pd.DataFrame:
    """Mean log p(true type) and its drop with each candidate multiplied by each factor."""
    base = score(model)
    rows = []
    for t in targets.itertuples():
        for factor in scales:
            with edited_weights(model, [WeightEdit.single(t.module, t.row, t.col, factor)]):
                scores = score(model)
            rows.append(
                {
                    "candidate": candidate_id(layer_of(t.module), t.row, t.col),
                    "factor": factor,
                    "log_likelihood": float(scores.mean()),
                    "effect": float((base - scores).mean()),
                }
            )
    return pd.DataFrame(rows, columns=["candidate", "factor", "log_likelihood", "effect"])


def _shift(model, score: CellTypeScore, targets: pd.DataFrame, classes) -> pd.DataFrame:
    """Mean predicted probability of each class, original vs each candidate pruned."""
    before = np.exp(score.log_probs(model)).mean(axis=0)
    rows = []
    for t in targets.itertuples():
        with edited_weights(model, [_prune(t)]):
            after = np.exp(score.log_probs(model)).mean(axis=0)
        cid = candidate_id(layer_of(t.module), t.row, t.col)
        for name, b, a in zip(classes, before, after, strict=True):
            rows.append(
                {
                    "candidate": cid,
                    "class": name,
                    "original": float(b),
                    "pruned": float(a),
                    "change": float(a - b),
                    "ratio": float(a / b) if b else math.nan,
                }
            )
    return pd.DataFrame(
        rows, columns=["candidate", "class", "original", "pruned", "change", "ratio"]
    )


def _cells(result: Confirmation, obs: pd.DataFrame, labels, classes) -> pd.DataFrame:
    """One row per candidate and cell: the drop of its log p(true type) when pruned, and
    the super activation on the cell's spike token (`spike`)."""
    frames = []
    for cid, delta in result.example_effects.items():
        frames.append(
            pd.DataFrame(
                {
                    "candidate": cid,
                    "cell_id": obs.index.astype(str),
                    "cell_type": [classes[i] for i in labels],
                    "donor": obs["donor"].astype(str).to_numpy(),
                    "log_likelihood": result.base_scores,
                    "effect": delta,
                    "spike": _per_cell(result.spike_values.get(cid), len(delta)),
                }
            )
        )
    columns = ["candidate", "cell_id", "cell_type", "donor", "log_likelihood", "effect", "spike"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _per_cell(values: np.ndarray | None, n: int) -> np.ndarray:
    """One spike value per cell, or NaN when they were not recorded one per cell."""
    return values if values is not None and len(values) == n else np.full(n, math.nan)


def _cell_map(model, score, obs, labels, classes, result: Confirmation, strata) -> ad.AnnData:
    """Evaluated cells with their `<cls>` embedding, effects and null weights' effects."""
    with torch.no_grad():
        embedding = torch.cat(
            [model(b["gene_ids"], b["values"], b["padding_mask"], heads=())["cell_emb"]
             for b in score.batches]
        )  # fmt: skip
    meta = pd.DataFrame(
        {"cell_type": [classes[i] for i in labels], "donor": obs["donor"].astype(str).to_numpy()},
        index=obs.index.astype(str),
    )
    for column in strata:
        if column in obs.columns:
            meta[column] = obs[column].astype(str).to_numpy()
    cells = ad.AnnData(obs=meta, obsm={"X_cls": embedding.float().cpu().numpy()})
    cells.obs["log_likelihood"] = result.base_scores
    for cid, delta in result.example_effects.items():
        cells.obs[f"effect {cid}"] = delta
        cells.obs[f"spike {cid}"] = _per_cell(result.spike_values.get(cid), len(delta))
        cells.obsm[f"null {cid}"] = result.null_example_effects[cid][:CELL_NULLS].T
    cells.uns["candidates"] = list(result.example_effects)
    cells.uns["confirmed"] = result.confirmed
    cells.uns["super_weights"] = result.super_weights
    return cells


def _strata(cells: pd.DataFrame, obs: pd.DataFrame, settings: AblateSettings) -> pd.DataFrame:
    """Effect per candidate within each cell type and each value of the strata columns.

    The CI is a bootstrap over the stratum's donors. Strata with fewer than `min_donors`
    donors keep their cell and donor counts but no effect: too few to compare. The super
    activation's mean and SD over the stratum's cells (`spike_mean`, `spike_sd`) show
    whether it is a fixed bias or varies between cell types and stages.
    """
    groups = [(CELL_TYPE, cells["cell_type"].to_numpy())]
    for column in settings.strata_columns:
        if column in obs.columns:
            values = obs[column].astype(object).where(obs[column].notna(), None).to_numpy()
            groups.append((column, np.tile(values, len(cells) // max(len(obs), 1))))
        else:
            log.info("no obs column %r: no strata by it", column)
    rng = np.random.default_rng(settings.seed)
    rows = []
    for cid, own in cells.groupby("candidate", sort=False):
        index = own.index.to_numpy()
        for column, values in groups:
            values = values[index]
            for value in pd.unique(values[pd.notna(values)]):
                part = own[values == value]
                rows.append(
                    _stratum_row(cid, column, str(value), part, settings, rng)
                )  # fmt: skip
    columns = ["candidate", "stratum", "value", "n_cells", "n_donors", "spike_mean", "spike_sd",
               "effect", "ci_low", "ci_high", "status"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _stratum_row(cid, column, value, part, settings: AblateSettings, rng) -> dict:
    donors = part["donor"].to_numpy()
    n_donors = len(set(donors))
    spike = part["spike"].astype(float)
    row = {"candidate": cid, "stratum": column, "value": value, "n_cells": len(part),
           "n_donors": n_donors, "spike_mean": spike.mean(),
           "spike_sd": spike.std(ddof=1)}  # fmt: skip
    if n_donors < settings.min_donors:
        return row | {"effect": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                      "status": f"too few donors ({n_donors} < {settings.min_donors})"}  # fmt: skip
    labels, index = np.unique(donors, return_inverse=True)
    sums = np.bincount(index, weights=part["effect"].to_numpy())
    counts = np.bincount(index).astype(float)
    picks = rng.integers(0, len(labels), size=(settings.n_boot, len(labels)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return row | {"effect": float(part["effect"].mean()), "ci_low": float(low),
                  "ci_high": float(high), "status": "compared"}  # fmt: skip


def ablate(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    candidates: str | Path | pd.DataFrame,
    settings: AblateSettings,
    device: str | torch.device | None = None,
    selection_splits: tuple[str, ...] = (),
) -> AblationResult:
    """Run the ablation test of a fine-tuned checkpoint on (up to `max_cells`) cells of
    `settings.split`. `selection_splits`: the splits the probe selected candidates on; an
    overlap is allowed but logged and stated in the summary."""
    test = load_test_cells(
        tokenised,
        checkpoint,
        batch_size=settings.batch_size,
        max_seq_len=settings.max_seq_len,
        seed=settings.seed,
        max_cells=settings.max_cells,
        device=device,
        split=settings.split,
    )
    batches = test.batches
    was_training = test.model.training
    test.model.eval()
    try:
        result = run_ablation(
            test.model, batches, test.classes, read_candidates(candidates), settings, test.obs
        )
    finally:
        test.model.train(was_training)
    shared = sorted(set(selection_splits) & {settings.split})
    if shared:
        note = (
            f"the probe selected candidates on split(s) {shared}, which are evaluated here "
            "too: effects are biased upwards (selection and evaluation share cells)"
        )
        log.warning(note)
        result.summary["selection_warning"] = note
    result.summary["selection_splits"] = list(selection_splits)
    return result


def confirm_checkpoint(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    candidates: str | Path | pd.DataFrame,
    settings: AblateSettings,
    score: str = "auto",
    device: str | torch.device | None = None,
) -> Confirmation:
    """Confirm candidates of any scGPT checkpoint on `settings.split` cells, donors as groups.

    `score`: "cell-type" (log p(true type); needs a classifier head for this dataset's
    types), "masked-expression" (Gaussian log-likelihood of masked values; any checkpoint)
    or "auto" (cell-type when the head fits the data, else masked-expression).
    """
    if score not in ("auto", "cell-type", "masked-expression"):
        raise UserError(f"score must be auto, cell-type or masked-expression, not {score!r}")
    if score == "auto":
        data = read_tokenised(tokenised)
        n_cls = checkpoint_config(*read_args_and_vocab(Path(checkpoint)), None).n_cls
        score = "cell-type" if n_cls == len(class_names(data)) else "masked-expression"
        tokenised = data
    labelled = score == "cell-type"
    cells = load_test_cells(
        tokenised, checkpoint, batch_size=settings.batch_size, max_seq_len=settings.max_seq_len,
        seed=settings.seed, max_cells=settings.max_cells, device=device, split=settings.split,
        labelled=labelled,
    )  # fmt: skip
    batches = cells.batches
    scorer = (
        CellTypeScore(cells.model, batches, precision=settings.precision)
        if labelled
        else MaskedExpressionScore(cells.model, batches, settings.mask_ratio, settings.seed,
                                   precision=settings.precision)
    )  # fmt: skip
    log.info("confirming on %d %s cells with the %s score", len(cells.obs), settings.split, score)
    return confirm_super_weights(
        cells.model,
        read_candidates(candidates),
        scorer,
        settings=settings.confirm_settings(),
        groups=cells.obs["donor"].astype(str).to_numpy(),
        progress=True,
    )


def write_outputs(result: AblationResult, outputs) -> list[Path]:
    """Write the tables and summary.json, each atomically.

    `outputs`: a folder or the rule's named outputs (`named_paths`).
    """
    paths = named_paths(outputs, OUTPUT_FILES)
    tables = [write_tsv(paths[name], getattr(result, name)) for name in OUTPUT_TABLES]
    cell_map = write_h5ad(result.cell_map, paths["cells_h5ad"])
    return [*tables, write_json(paths["summary"], result.summary), cell_map]
