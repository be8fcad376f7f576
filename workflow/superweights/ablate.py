"""Confirm super-weight candidates of a fine-tuned scGPT classifier on held-out donors.

The verdicts come from the model-agnostic core (`confirm_super_weights`) with the
classifier's objective as the score: log p(true cell type) of each evaluation cell, and
donors as the groups of the bootstrap. The probe selects candidates on other cells
(validation by default), so selection and evaluation never share cells unless the
configuration says so, and then the summary says it too. Beside the verdicts, this stage
writes what a reader asks next: the effect of scaling each candidate (Yu et al.'s sweep),
the shift of predicted class probabilities, the effect per cell type and per AD stratum
(strata with fewer than `min_donors` test donors are marked, not compared), and each
cell's own effect. AD stages are compared by donor, not by cell (`_strata`, `_trend`): each
stratum's effect is the mean of its donors' mean effects with a t interval over donors and
the smallest effect it could detect; strata with fewer than `min_donors` donors are listed,
not compared; a trend across ordered stages (ADNC, Braak) is Spearman's rho between stage
and donor effect, tested by permuting the stages among donors. `cells.h5ad` holds, per
evaluated cell, its `<cls>` embedding
(`obsm["X_cls"]`), metadata, each candidate's effect (`obs["effect_<candidate>"]`, e.g.
`effect_L1_5_7`: `outputs.cell_key`) and the per-cell effects of up to `CELL_NULLS` of its
null weights (`obsm["null_<candidate>"]`), for
the cell map and the gene–effect association (`cell_map`).

Expression measures (masked-expression log-likelihood) are reported only when the
expression decoder was trained together with the encoder under test
(`expression_trained`, i.e. fine-tuning with `mlm_weight` > 0); otherwise the decoder is
stale and the summary says why they are left out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import optimize, stats
from torch import Tensor

from .confirm import (
    Confirmation,
    candidate_id,
    confirm_super_weights,
)
from .data.preprocess import class_names, read_tokenised
from .editing import WeightEdit, check_candidate, edited_weights, layer_of, read_candidates
from .errors import UserError
from .model.checkpoint import checkpoint_config, read_args_and_vocab
from .model.finetuned import load_test_cells
from .model.scgpt import ScGPTModel
from .outputs import cell_key, named_paths, write_h5ad, write_json, write_tsv
from .scores import CellTypeScore, MaskedExpressionScore
from .settings import AblateSettings

log = logging.getLogger(__name__)

CELL_TYPE = "cell type"
CELL_NULLS = 99
"""Null weights per candidate whose per-cell effects go to cells.h5ad (the first draws)."""
SCORES = {
    "cell-type": "log p(true cell type) per cell",
    "masked-expression": "masked-expression log-likelihood per cell",
}
"""What each score of a confirmation measures, as the summaries state it."""


@dataclass
class AblationResult:
    """Tables of one ablation run (see `write_outputs` for the files)."""

    confirmed: pd.DataFrame
    nulls: pd.DataFrame
    topk: pd.DataFrame
    scaling: pd.DataFrame
    shift: pd.DataFrame
    strata: pd.DataFrame
    trend: pd.DataFrame
    cells: pd.DataFrame
    summary: dict
    cell_map: ad.AnnData


OUTPUT_TABLES = ("confirmed", "nulls", "topk", "scaling", "shift", "strata", "trend", "cells")
OUTPUT_FILES = {name: f"{name}.tsv" for name in OUTPUT_TABLES} | {
    "summary": "summary.json",
    "cells_h5ad": "cells.h5ad",
}
CONFIRM_FILES = ("confirmed", "nulls", "topk", "summary")
"""The files of a confirmation alone (`run` with a score), named as in `OUTPUT_FILES`."""


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
        "score": SCORES["cell-type"],
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
        trend=_trend(cells, obs, settings),
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
        cells.obs[cell_key("effect", cid)] = delta
        cells.obs[cell_key("spike", cid)] = _per_cell(result.spike_values.get(cid), len(delta))
        cells.obsm[cell_key("null", cid)] = result.null_example_effects[cid][:CELL_NULLS].T
    cells.uns["candidates"] = list(result.example_effects)
    cells.uns["confirmed"] = result.confirmed
    cells.uns["super_weights"] = result.super_weights
    return cells


def _strata(cells: pd.DataFrame, obs: pd.DataFrame, settings: AblateSettings) -> pd.DataFrame:
    """Effect per candidate within each cell type and each value of the strata columns,
    with donors as the unit.

    The effect is the mean of the stratum's donor means, with a t interval over donors, a
    one-sample t-test against 0 and `mde`, the smallest |effect| the stratum's donors could
    detect (80% power, two-sided 5%). Strata with fewer than `min_donors` donors keep their
    cell and donor counts but no effect: too few to compare. The super activation's mean
    and SD over the stratum's cells (`spike_mean`, `spike_sd`) show whether it is a fixed
    bias or varies between cell types and stages.
    """
    rows = []
    for cid, own, column, values in _stratified(cells, obs, settings):
        for value in pd.unique(values[pd.notna(values)]):
            rows.append(_stratum_row(cid, column, str(value), own[values == value], settings))
    columns = ["candidate", "stratum", "value", "n_cells", "n_donors", "spike_mean", "spike_sd",
               "effect", "ci_low", "ci_high", "p_value", "mde", "status"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _stratified(cells: pd.DataFrame, obs: pd.DataFrame, settings: AblateSettings):
    """(candidate, its cells, column, each cell's value in it) for the cell type and every
    strata column present."""
    groups = [(CELL_TYPE, cells["cell_type"].to_numpy())]
    for column in settings.strata_columns:
        if column in obs.columns:
            values = obs[column].astype(object).where(obs[column].notna(), None).to_numpy()
            groups.append((column, np.tile(values, len(cells) // max(len(obs), 1))))
        else:
            log.info("no obs column %r: no strata by it", column)
    for cid, own in cells.groupby("candidate", sort=False):
        index = own.index.to_numpy()
        for column, values in groups:
            yield cid, own, column, values[index]


def _stratum_row(cid, column, value, part, settings: AblateSettings) -> dict:
    donors = part.groupby("donor")["effect"].mean()
    n = len(donors)
    spike = part["spike"].astype(float)
    row = {"candidate": cid, "stratum": column, "value": value, "n_cells": len(part),
           "n_donors": n, "spike_mean": spike.mean(), "spike_sd": spike.std(ddof=1)}  # fmt: skip
    if n < settings.min_donors:
        return row | {"effect": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                      "p_value": math.nan, "mde": math.nan,
                      "status": f"too few donors ({n} < {settings.min_donors})"}  # fmt: skip
    mean, sd = float(donors.mean()), float(donors.std(ddof=1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(donors, 0.0).pvalue) if sd > 0 else math.nan
    return row | {"effect": mean, "ci_low": mean - half, "ci_high": mean + half,
                  "p_value": p, "mde": detectable_mean(n, sd), "status": "compared"}  # fmt: skip


def detectable_mean(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |mean| a two-sided one-sample t-test on `n` values of SD `sd` detects with
    `power` at level `alpha` (noncentral t)."""
    if n < 2 or not sd > 0:
        return math.nan
    crit = stats.t.ppf(1 - alpha / 2, n - 1)

    def shortfall(ncp: float) -> float:  # the far tail underflows to NaN, where it is ~0
        far = np.nan_to_num(stats.nct.cdf(-crit, n - 1, ncp))
        return stats.nct.sf(crit, n - 1, ncp) + far - power

    return float(optimize.brentq(shortfall, 0.0, 40.0)) * sd / math.sqrt(n)


def _unit(x: np.ndarray) -> np.ndarray:
    """`x` centred and scaled to unit norm (zeros when constant)."""
    x = x - x.mean()
    norm = np.linalg.norm(x)
    return x / norm if norm > 0 else x


STAGE_ORDER = {"not ad": 0, "low": 1, "intermediate": 2, "high": 3}
"""ADNC levels in order; SEA-AD's neurotypical "Reference" donors are not a stage."""
ROMAN = {"0": 0, "i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6}


def stage_rank(value) -> float:
    """A stage's place in its order: ADNC levels, "Braak III"-style numerals, or a number;
    NaN for anything else (e.g. "Reference")."""
    text = str(value).strip().lower()
    if text in STAGE_ORDER:
        return float(STAGE_ORDER[text])
    last = text.split()[-1] if text else ""
    if last in ROMAN:
        return float(ROMAN[last])
    try:
        return float(text)
    except ValueError:
        return math.nan


def _trend(cells: pd.DataFrame, obs: pd.DataFrame, settings: AblateSettings) -> pd.DataFrame:
    """Per candidate and ordered strata column: Spearman's rho between each donor's stage
    and mean effect, its p from permuting the stages among the donors, and `mde_rho`, the
    smallest |rho| detectable with 80% power (Fisher z approximation)."""
    rng = np.random.default_rng(settings.seed)
    rows = []
    for cid, own, column, values in _stratified(cells, obs, settings):
        if column == CELL_TYPE:
            continue
        ranks = pd.Series([stage_rank(v) for v in values], index=own.index)
        donors = own.assign(rank=ranks).dropna(subset=["rank"]).groupby("donor")
        table = pd.DataFrame({"rank": donors["rank"].first(), "effect": donors["effect"].mean()})
        n, n_stages = len(table), table["rank"].nunique()
        row = {"candidate": cid, "stratum": column, "n_donors": n, "n_stages": n_stages}
        if n < settings.min_donors or n_stages < 2:
            rows.append(row | {"rho": math.nan, "p_value": math.nan, "mde_rho": math.nan,
                               "status": f"too few donors or stages ({n} donors, "
                                         f"{n_stages} stages)"})  # fmt: skip
            continue
        effect, rank = (_unit(stats.rankdata(table[c])) for c in ("effect", "rank"))
        rho = float(rank @ effect)  # Spearman's rho: the correlation of the ranks
        null = rng.permuted(np.tile(rank, (settings.n_permutations, 1)), axis=1) @ effect
        p = (1 + int((np.abs(null) >= abs(rho) - 1e-12).sum())) / (settings.n_permutations + 1)
        z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
        mde = math.tanh(z / math.sqrt(n - 3)) if n > 3 else math.nan
        rows.append(row | {"rho": rho, "p_value": p, "mde_rho": mde, "status": "compared"})
    columns = ["candidate", "stratum", "n_donors", "n_stages", "rho", "p_value", "mde_rho",
               "status"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


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


def checkpoint_score(data: ad.AnnData, checkpoint: str | Path) -> str:
    """The score "auto" stands for: "cell-type" when the checkpoint's classifier head fits
    the data's cell types, else "masked-expression"."""
    n_cls = checkpoint_config(*read_args_and_vocab(Path(checkpoint)), None).n_cls
    return "cell-type" if n_cls == len(class_names(data)) else "masked-expression"


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
    if score == "auto":
        tokenised = read_tokenised(tokenised)
        score = checkpoint_score(tokenised, checkpoint)
    if score not in SCORES:
        raise UserError(f"score must be auto, cell-type or masked-expression, not {score!r}")
    labelled = score == "cell-type"
    cells = load_test_cells(
        tokenised, checkpoint, batch_size=settings.batch_size, seed=settings.seed,
        max_cells=settings.max_cells, device=device, split=settings.split, labelled=labelled,
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


def run(
    inputs,
    outputs,
    settings: AblateSettings,
    *,
    score: str | None = None,
    selection_splits: tuple[str, ...] = (),
) -> AblationResult | Confirmation:
    """The pruning stage: test `inputs["candidates"]` of `inputs["checkpoint"]` on
    `inputs["data"]` and write the results to `outputs`.

    Without `score`, the ablation of a fine-tuned classifier (`ablate`, with
    `selection_splits`): every table of `write_outputs` and the figures of `ablate_plots`.
    With a `score` of `confirm_checkpoint` ("auto", "cell-type", "masked-expression"), the
    confirmation alone, for any checkpoint: the `CONFIRM_FILES`, its summary naming the
    score used.
    """
    checkpoint, candidates = inputs["checkpoint"], inputs["candidates"]
    if score is None:
        from .ablate_plots import write_figures

        result = ablate(
            inputs["data"], checkpoint, candidates, settings, selection_splits=selection_splits
        )
        write_outputs(result, outputs)
        write_figures(result, outputs)
        return result
    data = read_tokenised(inputs["data"])
    score = checkpoint_score(data, checkpoint) if score == "auto" else score
    confirmation = confirm_checkpoint(data, checkpoint, candidates, settings, score)
    paths = named_paths(outputs, {name: OUTPUT_FILES[name] for name in CONFIRM_FILES})
    write_tsv(paths["confirmed"], confirmation.to_frame())
    write_tsv(paths["nulls"], confirmation.nulls)
    write_tsv(paths["topk"], confirmation.topk)
    summary = {
        "score": SCORES[score],
        "warning": confirmation.warning,
        "settings": confirmation.settings,
    }
    write_json(paths["summary"], summary)
    return confirmation
