"""Confirm super-weight candidates of any PyTorch model by pruning them against two nulls.

For each candidate ``W[row, col]`` of a module, the effect is the mean drop of a
per-example score (higher is better, e.g. log-likelihood per cell or per sequence) when
that one weight is set to 0. It is compared with:

- a null of ``n_null`` magnitude-matched weights of the same matrix (|w| within a factor
  ``band`` of the candidate's, its own row and column excluded), each pruned alone; when
  the band holds too few weights (a super weight is often its matrix's largest), the
  ``n_null`` largest-|w| weights of the matrix are used instead, and the table says so.
  The empirical p-value is ``(1 + #null effects >= effect) / (n_null + 1)``; q is
  Benjamini-Hochberg over all candidates. This null decides `confirmed`;
- a second null of ``n_null`` contribution-matched weights of the same matrix: weights
  whose largest term ``|x[t, k]| * |w|`` over the evaluation tokens is within a factor
  ``band`` of the candidate's (the same input column included: it asks whether the weight
  matters more than others that carry an equally large term), else the matrix's largest
  contributions, recorded as such. Its p and q are reported beside the first;
- the top-k control of Yu et al. 2024: the k largest-|w| weights of every weight matrix of
  the layer stack (attention and MLP alike) pruned together with the candidates kept, k a
  fraction of those weights (the paper's 7,000 of Llama-7B's 6.7 B by default, with a
  sweep of larger fractions shown beside it);
- the super activation restored: the candidate pruned and, on each sequence's spike token
  only, the module's output channel ``row`` written back (how much of the effect travels
  through the super activation); and, with the weight kept, that activation set to 0 and
  to its mean over sequences (Sun et al. 2024: is it a fixed bias?).

A candidate is confirmed when q <= alpha, the effect reaches ``min_effect``, its confidence
interval excludes 0 (the drop is consistent across examples or groups) and it exceeds the
top-k control. Its tier (`TIERS`) adds the mechanism: a ``super weight`` is a confirmed
candidate the probe accepted as a massive activation (column ``accepted``), that beats the
contribution-matched null at alpha too, and whose effect is recovered at least
``min_recovery`` by restoring its activation; any other confirmed candidate is an
``important weight``; the rest are ``not confirmed``. ``reason`` names every failed
condition. The effect's confidence interval is a percentile bootstrap over examples, or
over ``groups`` (e.g. donors) when given. Every weight is restored bit for bit; the same
seed gives the same table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.stats import false_discovery_control
from torch import Tensor, nn
from tqdm import tqdm

from .editing import (
    WeightEdit,
    check_candidate,
    edited_weights,
    evaluation,
    layer_of,
    read_candidates,
)
from .errors import UserError
from .settings import ConfirmSettings

log = logging.getLogger(__name__)

TIERS = ("super weight", "important weight", "not confirmed")
"""Verdict tiers, strongest first (see the module docstring)."""

TABLE_COLUMNS = [
    "candidate", "module", "layer", "row", "col", "weight", "tier", "effect", "ci_low",
    "ci_high", "n_examples", "n_groups", "null", "n_null", "null_mean", "null_sd", "null_q95",
    "p_value", "q_value", "contribution", "contribution_null", "contribution_null_mean",
    "contribution_null_q95", "p_contribution", "q_contribution", "topk_k", "topk_effect",
    "massive", "restore_spike_effect", "recovered", "spike_mean", "spike_sd",
    "zero_spike_effect", "mean_spike_effect", "confirmed", "reason",
]  # fmt: skip
NULL_KINDS = ("magnitude", "contribution")
"""The `kind` column of the null-draws table."""

Score = Callable[[nn.Module], Tensor]


@dataclass
class Confirmation:
    """Per-candidate verdicts, both nulls' draws (`nulls`, column `kind`), the top-k effects,
    and per-example values: each candidate's effects (`example_effects`), its magnitude-null
    draws' effects (`null_example_effects`, [draws, examples] in the order of those draws)
    and its super activation on each sequence's spike token (`spike_values`)."""

    table: pd.DataFrame
    nulls: pd.DataFrame
    topk: pd.DataFrame
    example_effects: dict[str, np.ndarray]
    base_scores: np.ndarray
    settings: dict
    warning: str = ""
    groups: np.ndarray | None = field(default=None, repr=False)
    null_example_effects: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    spike_values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    @property
    def confirmed(self) -> list[str]:
        return self.table.loc[self.table["confirmed"], "candidate"].tolist()

    @property
    def super_weights(self) -> list[str]:
        return self.table.loc[self.table["tier"] == TIERS[0], "candidate"].tolist()


def candidate_id(layer: int | None, row: int, col: int) -> str:
    return f"L{layer}[{row},{col}]"


def confirm_super_weights(
    model: nn.Module,
    candidates,
    score: Score,
    *,
    n_null: int = 99,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | None = None,
    settings: ConfirmSettings | None = None,
    progress: bool = False,
) -> Confirmation:
    """Prune each candidate and its controls, decide which are confirmed, and give each a tier.

    `candidates`: a `ProbeResult`, a DataFrame or a TSV path with module, row, col (and,
    when present, the weight, checked against the model, and ``accepted``: whether the
    probe found a massive activation there; True when absent). `score(model)` returns a 1-D
    tensor of per-example scores, higher is better, the same examples in the same order on
    every call. If it offers ``score.from_layer(layer)`` (a context manager reusing the
    hidden states entering ``layer``), evaluations that only touch that layer and later
    ones use it; if it has ``score.padding_masks`` (a [B, L] mask, True = pad, per forward
    call of the module), padding tokens are never taken for the spike token nor for the
    contributions; if it has ``score.zeroed_scores(model, module, positions)`` (scores
    [positions, examples], each weight pruned alone, for modules where
    ``score.batches_conditions(module)``), the candidate and its null draws are scored
    through it. `groups`: one label per example for a grouped bootstrap. `settings`
    overrides `n_null`, `alpha` and `seed`. The model's weights and modes are restored.
    """
    settings = settings or ConfirmSettings(n_null=n_null, alpha=alpha, seed=seed)
    table = read_candidates(candidates).drop_duplicates(["module", "row", "col"])
    targets = [_target(model, r) for r in table.itertuples(index=False)]
    warning = settings.power_warning(len(targets))
    if warning:
        log.warning(warning)
    with evaluation(model):
        padding = getattr(score, "padding_masks", None)
        packings = getattr(score, "packings", None)
        base, recorded, peaks = _base_scores(model, score, targets, padding)
        groups = _check_groups(groups, len(base))
        runner = _Runner(model, score, base)
        rows, nulls, effects, null_effects_per_example, spikes = [], [], {}, {}, {}
        for i, t in enumerate(tqdm(targets, desc="confirm", disable=None if progress else True)):
            log.info("confirm: %s (%d of %d)", t["id"], i + 1, len(targets))
            rng = np.random.default_rng([settings.seed, i])
            places = _spike_places(recorded[t["id"]], padding, packings)
            spikes[t["id"]] = np.concatenate([v.double().cpu().numpy() for _, v in places])
            with _from_layer(score, t["layer"]):
                matrix = _weight(model, t["module"])
                draws = {
                    "magnitude": null_positions(
                        matrix, t["row"], t["col"], settings.n_null, settings.band, rng
                    ),
                    "contribution": contribution_positions(
                        matrix, peaks[t["module"]], t["row"], t["col"], settings.n_null,
                        settings.band, rng,
                    ),
                }  # fmt: skip
                positions = [p for _, kind_positions in draws.values() for p in kind_positions]
                deltas = runner.zeroed(t["module"], [(t["row"], t["col"]), *positions])
                delta, start, null = deltas[0], 1, {}
                for kind, (description, kind_positions) in draws.items():
                    per_example = deltas[start : start + len(kind_positions)]
                    start += len(kind_positions)
                    null[kind] = (description, per_example.mean(axis=1))
                    for draw, ((r, c), eff) in enumerate(
                        zip(kind_positions, null[kind][1], strict=True)
                    ):
                        nulls.append({"candidate": t["id"], "kind": kind, "draw": draw, "row": r,
                                      "col": c, "weight": float(matrix[r, c]),
                                      "effect": float(eff)})  # fmt: skip
                    if kind == "magnitude":
                        null_effects_per_example[t["id"]] = per_example
                edit = [WeightEdit.single(t["module"], t["row"], t["col"])]
                with _written_spike(model, t, places, "own"):
                    restored = runner.delta(edit)
                activation = {}
                for how in ("zero", "mean"):
                    with _written_spike(model, t, places, how):
                        activation[how] = float(runner.delta([]).mean())
            effects[t["id"]] = delta
            rows.append(_row(t, delta, null, restored, activation, spikes[t["id"]]))
            rows[-1] |= {"contribution": abs(t["weight"]) * float(peaks[t["module"]][t["col"]])}
            rows[-1] |= _bootstrap(delta, groups, settings, rng)
        topk = _topk_controls(model, targets, runner, settings)
    frame = _decide(pd.DataFrame(rows), topk, settings, warning)
    columns = ["candidate", "kind", "draw", "row", "col", "weight", "effect"]
    return Confirmation(
        table=frame,
        nulls=pd.DataFrame(nulls, columns=columns),
        topk=topk,
        example_effects=effects,
        base_scores=base,
        settings=asdict(settings),
        warning=warning,
        groups=groups,
        null_example_effects=null_effects_per_example,
        spike_values=spikes,
    )


def weight_effects(
    model: nn.Module,
    candidates,
    score: Score,
    *,
    groups: Sequence | None = None,
    settings: ConfirmSettings | None = None,
) -> pd.DataFrame:
    """Effect (mean score drop when pruned) and its bootstrap CI of each candidate, without
    a null: for weights already judged elsewhere (e.g. in the model before fine-tuning)."""
    settings = settings or ConfirmSettings()
    table = read_candidates(candidates).drop_duplicates(["module", "row", "col"])
    targets = [_target(model, r) for r in table.itertuples(index=False)]
    rows = []
    with evaluation(model):
        base = _checked(score(model), None, "")
        groups = _check_groups(groups, len(base))
        runner = _Runner(model, score, base)
        for i, t in enumerate(targets):
            with _from_layer(score, t["layer"]):
                delta = runner.delta([WeightEdit.single(t["module"], t["row"], t["col"])])
            rng = np.random.default_rng([settings.seed, i])
            keys = ("module", "layer", "row", "col", "weight")
            row = {"candidate": t["id"]} | {k: t[k] for k in keys}
            rows.append(row | {"effect": float(delta.mean())}
                        | _bootstrap(delta, groups, settings, rng))  # fmt: skip
    columns = ["candidate", "module", "layer", "row", "col", "weight", "effect", "ci_low",
               "ci_high", "n_groups"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


# --- candidates and scores ------------------------------------------------------------


def _target(model: nn.Module, r) -> dict:
    module, row, col = str(r.module), int(r.row), int(r.col)
    weight = check_candidate(model, module, row, col, getattr(r, "weight", math.nan))
    layer = layer_of(module)
    return {
        "id": candidate_id(layer, row, col),
        "module": module,
        "layer": layer,
        "row": row,
        "col": col,
        "weight": weight,
        "massive": bool(getattr(r, "accepted", True)),
    }


def _weight(model: nn.Module, module: str) -> Tensor:
    return dict(model.named_modules())[module].weight.detach()


def _checked(scores, n: int | None, what: str) -> np.ndarray:
    """Scores as float64, after checking they are a finite 1-D tensor of n examples."""
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise UserError(f"score(model) must return a 1-D tensor of per-example scores, got {shape}")
    if n is not None and len(scores) != n:
        raise UserError(f"score(model) returned {len(scores)} scores {what}, {n} at first")
    out = scores.detach().double().cpu().numpy()
    if not np.isfinite(out).all():
        raise UserError(f"score(model) returned non-finite values {what}")
    return out


class _Runner:
    """Scores of the model under weight edits, as drops from the unedited scores."""

    def __init__(self, model: nn.Module, score: Score, base: np.ndarray):
        self.model, self.score, self.base = model, score, base

    def delta(self, edits: list[WeightEdit]) -> np.ndarray:
        """Drops with `edits` applied (none: under whatever hooks are in place)."""
        with edited_weights(self.model, edits):
            e = edits[0] if edits else None
            what = f"with {e.module}[{e.rows[0]}, {e.cols[0]}] edited" if e else "under a hook"
            return self.base - _checked(self.score(self.model), len(self.base), what)

    def zeroed(self, module: str, positions: list[tuple[int, int]]) -> np.ndarray:
        """Drops [len(positions), examples], each weight of `module` pruned alone: in
        stacked forward passes when the score offers them (``score.zeroed_scores``, for
        modules where ``score.batches_conditions(module)``), else one after another."""
        batches = getattr(self.score, "batches_conditions", None)
        if batches is None or not batches(module):
            return np.stack([self.delta([WeightEdit.single(module, r, c)]) for r, c in positions])
        scores = self.score.zeroed_scores(self.model, module, positions)
        return np.stack([
            self.base - _checked(s, len(self.base), f"with {module}[{r}, {c}] zeroed")
            for s, (r, c) in zip(scores, positions, strict=True)
        ])  # fmt: skip


def _from_layer(score: Score, layer: int | None):
    cached = getattr(score, "from_layer", None)
    return cached(layer) if cached is not None and layer is not None else nullcontext()


def _base_scores(model, score, targets, padding):
    """Unedited scores; meanwhile each candidate's output channel is recorded per call, and
    each candidate module's largest |input| per input channel over the real tokens."""
    recorded: dict[str, list[Tensor]] = {t["id"]: [] for t in targets}
    peaks: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for t in targets:

        def hook(module, args, output, key=t["id"], row=t["row"]):
            recorded[key].append(output[..., row].detach().clone())

        handles.append(modules[t["module"]].register_forward_hook(hook))
    for name in dict.fromkeys(t["module"] for t in targets):
        calls = iter(padding) if padding is not None else None

        def input_hook(module, args, name=name, calls=calls):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            pad = next(calls, None) if calls is not None else None
            if pad is not None and pad.numel() == flat.shape[0]:
                flat = flat[~pad.reshape(-1).to(flat.device).bool()]
            peak = flat.float().abs().amax(0) if len(flat) else flat.new_zeros(flat.shape[1])
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

        handles.append(modules[name].register_forward_pre_hook(input_hook))
    try:
        base = _checked(score(model), None, "")
    finally:
        for handle in handles:
            handle.remove()
    if len(base) == 0:
        raise UserError("score(model) returned no examples")
    return base, recorded, {name: peak.cpu() for name, peak in peaks.items()}


def _check_groups(groups, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise UserError(f"groups has {groups.shape[0]} labels for {n} examples")
    return groups


def _spike_places(recorded: list[Tensor], padding, packings) -> list[tuple[Tensor, Tensor]]:
    """Per forward call, (flat index, original value) of channel `row` at each sequence's
    spike token: where its |original output| is largest in the sequence (3-D outputs
    [B, L, D], or 2-D outputs [T, D] of cells packed as `packings` give per call) or in the
    call (other 2-D outputs), outside the padding tokens when `padding` gives a [B, L] mask
    (True = pad) per call. Calls are matched in order."""
    masks = iter(padding) if padding is not None else None
    packs = iter(packings) if packings is not None else None
    places = []
    for original in recorded:
        mask = next(masks, None) if masks is not None else None
        packing = next(packs, None) if packs is not None else None
        if original.dim() == 1 and packing is not None:
            index = packing.starts() + packing.unpack(original.abs(), -1.0).argmax(1)
        elif original.dim() == 1:
            index = original.abs().argmax().reshape(1)
        else:
            flat = original.reshape(-1, original.shape[-1])
            magnitude = flat.abs()
            if mask is not None:
                magnitude = magnitude.masked_fill(mask.reshape(flat.shape).bool(), -1.0)
            index = magnitude.argmax(dim=1) + flat.shape[1] * torch.arange(
                len(flat), device=flat.device
            )
        places.append((index, original.reshape(-1)[index]))
    return places


@contextmanager
def _written_spike(model: nn.Module, t: dict, places, value: str) -> Iterator[None]:
    """On each sequence's spike token (`_spike_places`), write channel `row` of the module's
    output: its original value (`own`), 0 (`zero`) or the mean of the original values over
    all sequences (`mean`). Calls are matched in order."""
    calls = iter(places)
    mean = torch.cat([v.double() for _, v in places]).mean() if places else None

    def hook(module, args, output):
        index, original = next(calls)
        channel = output[..., t["row"]].reshape(-1)
        if value == "own":
            written = original.to(output.dtype)
        else:
            written = torch.full_like(original, 0.0 if value == "zero" else float(mean))
        output[..., t["row"]] = channel.index_copy(0, index, written.to(output.dtype)).view(
            output.shape[:-1]
        )
        return output

    handle = dict(model.named_modules())[t["module"]].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- nulls and controls ---------------------------------------------------------------


def null_positions(
    weight: Tensor, row: int, col: int, n_null: int, band: float, rng
) -> tuple[str, list[tuple[int, int]]]:
    """(which null, positions) of `n_null` null weights for `weight[row, col]`.

    Magnitude-matched: |w| within a factor `band` of the candidate's, its own row and
    column excluded, drawn with `rng`; when fewer qualify, the matrix's largest-|w| weights
    outside that row and column.
    """
    weight = weight.detach().float().abs().cpu()
    allowed = torch.ones_like(weight, dtype=torch.bool)
    allowed[row, :] = False
    allowed[:, col] = False
    return _banded_draw(weight, allowed, row, col, n_null, band, rng, "|w|")


def contribution_positions(
    weight: Tensor, input_peaks: Tensor, row: int, col: int, n_null: int, band: float, rng
) -> tuple[str, list[tuple[int, int]]]:
    """(which null, positions) of `n_null` contribution-matched null weights for
    `weight[row, col]`.

    A weight's contribution is its largest term ``|x[t, k]| * |w|`` over the evaluation
    tokens (`input_peaks`: the largest |x[t, k]| per input channel k). Drawn with `rng`
    among the weights whose contribution is within a factor `band` of the candidate's (the
    candidate itself excluded); when fewer qualify, the matrix's largest contributions.
    """
    contribution = weight.detach().float().abs().cpu() * input_peaks.float().cpu()[None, :]
    allowed = contribution > 0  # a weight whose input never fires carries no contribution
    allowed[row, col] = False
    return _banded_draw(contribution, allowed, row, col, n_null, band, rng, "max |x*w|")


def _banded_draw(values: Tensor, allowed: Tensor, row, col, n_null, band, rng, name: str):
    """(description, positions) of `n_null` entries of `values` (non-negative, [rows, cols])
    drawn with `rng` among the `allowed` ones within a factor `band` of `values[row, col]`;
    when fewer qualify, the largest allowed ones."""
    own = float(values[row, col])
    lo, hi = own / band, own * band
    in_band = allowed & (values >= lo) & (values <= hi)
    eligible = torch.nonzero(in_band.flatten()).flatten().numpy()
    if len(eligible) >= n_null:
        flat = np.sort(rng.choice(eligible, n_null, replace=False))
        kind = f"{name} in [{lo:.3g}, {hi:.3g}] ({len(eligible)} weights)"
    else:
        ranked = values.masked_fill(~allowed, -1.0).flatten()
        flat = torch.topk(ranked, min(n_null, int(allowed.sum()))).indices.numpy()
        kind = (
            f"largest {name} of the matrix (only {len(eligible)} weights in [{lo:.3g}, {hi:.3g}])"
        )
    width = values.shape[1]
    return kind, [(int(f) // width, int(f) % width) for f in flat]


def stack_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, tensor) of every weight matrix (2-D parameter) inside the layer stack: the
    attention projections as well as both MLP matrices."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if layer_of(name) is not None and p.ndim == 2
    ]


def topk_counts(model: nn.Module, fractions: Sequence[float]) -> dict[float, int]:
    """k per fraction of the layer stack's weight-matrix entries, at least 1."""
    total = sum(p.numel() for _, p in stack_weights(model))
    return {f: max(1, round(f * total)) for f in fractions}


def largest_weights(model: nn.Module, k: int, exclude: set) -> list[tuple[str, int, int]]:
    """(parameter, row, col) of the k largest-|w| entries of the layer stack's weight
    matrices, not in `exclude` (parameter names, e.g. ``layers.0.linear2.weight``)."""
    pool = []
    for name, p in stack_weights(model):
        w = p.detach().float().abs().cpu().clone()
        for param, row, col in exclude:
            if param == name:
                w[row, col] = -1.0
        values, index = torch.topk(w.flatten(), min(k, w.numel()))
        width = w.shape[1]
        pool += [
            (float(v), name, i // width, i % width)
            for v, i in zip(values, index.tolist(), strict=True)
        ]
    pool.sort(key=lambda p: -p[0])
    return [(name, row, col) for _, name, row, col in pool[:k]]


@contextmanager
def _zeroed_entries(model: nn.Module, entries: list[tuple[str, int, int]]) -> Iterator[None]:
    """Set each (parameter, row, col) to 0 inside the block; restore them exactly after."""
    params = dict(model.named_parameters())
    saved = []
    try:
        with torch.no_grad():
            for name in dict.fromkeys(name for name, _, _ in entries):
                mine = [(r, c) for n, r, c in entries if n == name]
                rows = torch.tensor([r for r, _ in mine], device=params[name].device)
                cols = torch.tensor([c for _, c in mine], device=params[name].device)
                saved.append((params[name], rows, cols, params[name][rows, cols].clone()))
                params[name][rows, cols] = 0
        yield
    finally:
        with torch.no_grad():
            for param, rows, cols, old in reversed(saved):
                param[rows, cols] = old


def _topk_controls(model, targets, runner: _Runner, settings: ConfirmSettings) -> pd.DataFrame:
    """Effect of pruning the k largest other weights of every matrix, per fraction
    (candidates kept)."""
    fractions = (settings.topk_fraction, *settings.topk_sweep)
    ks = topk_counts(model, fractions)
    matrices = stack_weights(model)
    total = sum(p.numel() for _, p in matrices)
    exclude = {(f"{t['module']}.weight", t["row"], t["col"]) for t in targets}
    largest = largest_weights(model, max(ks.values()), exclude) if targets else []
    rows, done = [], {}
    for fraction in fractions:
        k = ks[fraction]
        if k not in done and largest:
            with _zeroed_entries(model, largest[:k]):
                done[k] = float(
                    (runner.base - _checked(runner.score(model), len(runner.base), "")).mean()
                )
        rows.append(
            {
                "fraction": fraction,
                "k": k,
                "of_weights": total,
                "n_matrices": len(matrices),
                "matrices_hit": len({name for name, _, _ in largest[:k]}),
                "effect": done.get(k, math.nan),
                "decides": fraction == settings.topk_fraction,
            }
        )
    columns = ["fraction", "k", "of_weights", "n_matrices", "matrices_hit", "effect", "decides"]
    return pd.DataFrame(rows, columns=columns)


# --- statistics and decisions ---------------------------------------------------------


def _row(t: dict, delta, null: dict, restored, activation: dict, spikes: np.ndarray) -> dict:
    """One candidate's effect, both nulls' summaries and the activation measures."""
    effect = float(delta.mean())
    restore_effect = float(restored.mean())
    magnitude_kind, magnitude = null["magnitude"]
    contribution_kind, contribution = null["contribution"]
    return {
        "candidate": t["id"],
        "module": t["module"],
        "layer": t["layer"],
        "row": t["row"],
        "col": t["col"],
        "weight": t["weight"],
        "effect": effect,
        "n_examples": len(delta),
        "null": magnitude_kind,
        "n_null": len(magnitude),
        "null_mean": float(magnitude.mean()),
        "null_sd": float(magnitude.std(ddof=1)) if len(magnitude) > 1 else math.nan,
        "null_q95": float(np.quantile(magnitude, 0.95)),
        "p_value": _empirical_p(effect, magnitude),
        "contribution_null": contribution_kind,
        "contribution_null_mean": float(contribution.mean()),
        "contribution_null_q95": float(np.quantile(contribution, 0.95)),
        "p_contribution": _empirical_p(effect, contribution),
        "massive": t["massive"],
        "restore_spike_effect": restore_effect,
        "recovered": 1 - restore_effect / effect if effect > 0 else math.nan,
        "spike_mean": float(spikes.mean()) if len(spikes) else math.nan,
        "spike_sd": float(spikes.std(ddof=1)) if len(spikes) > 1 else math.nan,
        "zero_spike_effect": activation["zero"],
        "mean_spike_effect": activation["mean"],
    }


def _empirical_p(effect: float, null: np.ndarray) -> float:
    return (1 + int((null >= effect).sum())) / (len(null) + 1)


def _bootstrap(delta: np.ndarray, groups, settings: ConfirmSettings, rng) -> dict:
    """Percentile CI of the mean drop: resampling examples, or whole groups."""
    low, high = bootstrap_mean_ci(delta, groups, settings.n_boot, settings.ci, rng)
    n_groups = len(np.unique(groups)) if groups is not None else 0
    return {"ci_low": low, "ci_high": high, "n_groups": n_groups}


def bootstrap_mean_ci(values, groups, n_boot: int, ci: float, rng) -> tuple[float, float]:
    """Percentile CI (level `ci`) of the mean of `values` over `n_boot` resamples of the
    examples, or of whole `groups` (one label per example, e.g. donors) when given: each
    resample's mean is over the cells of the groups drawn, as often as drawn."""
    values = np.asarray(values, dtype=float)
    if groups is None:
        sums, counts = values, np.ones_like(values)
    else:
        labels, index = np.unique(groups, return_inverse=True)
        sums = np.bincount(index, weights=values, minlength=len(labels))
        counts = np.bincount(index, minlength=len(labels)).astype(float)
    n = len(sums)
    picks = rng.integers(0, n, size=(n_boot, n))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - ci) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (scipy's `false_discovery_control`; empty in, empty out)."""
    p = np.asarray(p, dtype=float)
    return false_discovery_control(p) if len(p) else p


def _decide(frame: pd.DataFrame, topk: pd.DataFrame, settings: ConfirmSettings, warning):
    if frame.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    decider = topk[topk["decides"]].iloc[0]
    frame["q_value"] = benjamini_hochberg(frame["p_value"].to_numpy())
    frame["q_contribution"] = benjamini_hochberg(frame["p_contribution"].to_numpy())
    frame["topk_k"], frame["topk_effect"] = int(decider["k"]), float(decider["effect"])
    verdicts = [_verdict(r, settings, warning) for r in frame.itertuples()]
    frame["tier"] = [v[0] for v in verdicts]
    frame["confirmed"] = frame["tier"] != TIERS[2]
    frame["reason"] = [v[1] for v in verdicts]
    return frame[TABLE_COLUMNS]


def _verdict(r, settings: ConfirmSettings, warning: str) -> tuple[str, str]:
    """(tier, reason): every failed condition of the confirmation, then of the mechanism."""
    failures = []
    if not r.q_value <= settings.alpha:
        failures.append(
            f"q {r.q_value:.3g} > alpha {settings.alpha:g} (p {r.p_value:.3g} against "
            f"{r.n_null} null weights: {r.null})"
        )
    if not r.effect >= settings.min_effect:
        failures.append(f"effect {r.effect:.4g} < min_effect {settings.min_effect:g}")
    if not r.ci_low > 0:
        where = "includes 0" if r.ci_high >= 0 else "lies below 0"
        failures.append(f"the {settings.ci:.0%} CI [{r.ci_low:.4g}, {r.ci_high:.4g}] {where}")
    if not r.effect > r.topk_effect:
        failures.append(
            f"effect {r.effect:.4g} does not exceed pruning the top-{r.topk_k} other weights "
            f"({r.topk_effect:.4g})"
        )
    mechanism = []
    if not r.massive:
        mechanism.append("the probe found no massive activation there")
    if not r.q_contribution <= settings.alpha:
        mechanism.append(
            f"contribution-matched q {r.q_contribution:.3g} > alpha {settings.alpha:g} "
            f"(p {r.p_contribution:.3g}: {r.contribution_null})"
        )
    if not r.recovered >= settings.min_recovery:
        mechanism.append(
            f"restoring the super activation recovers {r.recovered:.0%} of the effect "
            f"< min_recovery {settings.min_recovery:.0%}"
        )
    evidence = (
        f"mean drop {r.effect:.4g} [{r.ci_low:.4g}, {r.ci_high:.4g}], p {r.p_value:.3g}, "
        f"q {r.q_value:.3g} against {r.n_null} null weights ({r.null}); contribution-matched "
        f"p {r.p_contribution:.3g}, q {r.q_contribution:.3g}; top-{r.topk_k} control "
        f"{r.topk_effect:.4g}; recovered {r.recovered:.0%}"
    )
    if failures:
        reason = "not confirmed: " + "; ".join(failures + mechanism)
        return TIERS[2], f"{reason}; {warning}" if warning else reason
    if mechanism:
        return TIERS[1], f"important weight (confirmed, {evidence}), not a super weight: " + (
            "; ".join(mechanism)
        )
    return TIERS[0], f"super weight: confirmed ({evidence}), a massive activation"
