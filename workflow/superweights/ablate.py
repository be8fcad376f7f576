"""Confirm super-weight candidates by pruning them against controls (Yu et al. 2024).

Every condition is evaluated on the same held-out cells with the same masked values, in
float32: the original model; each candidate pruned (``W[row, col] = 0``) and all accepted
ones together; random weights of the same matrix; the k largest-|w| encoder weights with
the candidates kept; the candidate's row and column at other random positions; the
candidate pruned with its super activation written back (on all tokens, or on each
cell's spike token only); and a scaling sweep of the candidate. Measures: mean log p(true
cell type) overall, per type and macro-averaged, accuracy, macro-F1, masked-expression MSE
and Gaussian log-likelihood (variance of the original model's residuals), and the shift of
mean predicted class probabilities and gene expression. Restoring the activation on all
tokens gives the down-projection back its original output, so it checks that the damage
travels through that channel alone; restoring each cell's spike token only is the paper's
partial restoration.

Pruning a weight in layer l leaves the hidden states entering layer l unchanged, so they
are computed once and a condition reruns only layers l.. and the heads. Each edited weight
is written back from a saved copy, so the model ends bit-identical.
"""

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .errors import UserError
from .model.finetuned import load_test_cells
from .model.scgpt import ScGPTModel
from .model.tokens import mask_values
from .model.train import (
    classification_metrics,
)
from .outputs import write_json, write_tsv

log = logging.getLogger(__name__)

CELL_TYPE = "cell type"
_LAYER = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")
_SHIFT_KINDS = ("prune", "prune_all", "restore_all", "restore_spike", "topk")
_GENE_SHIFT_KINDS = ("prune", "prune_all")
_MEASURES = (
    "log_likelihood",
    "macro_log_likelihood",
    "accuracy",
    "macro_f1",
    "expr_mse",
    "expr_gaussian_ll",
)
_CONTROL_KINDS = ("random", "same_row", "same_col", "restore_all", "restore_spike")


@dataclass
class AblateSettings:
    """Controls, thresholds and cells of the pruning test.

    A candidate is confirmed when its collapse (original minus pruned mean log-likelihood)
    exceeds the mean collapse of `n_random` random weights of its matrix by at least
    `z_random` standard deviations and exceeds the collapse of the top-k control at
    `confirm_fraction`. Top-k controls prune k = round(fraction x encoder linear weights)
    for each of `topk_fractions`. When the probe accepted nothing, its `n_strongest` first
    rows are tested. `mask_ratio` 0 turns the expression measures off.
    """

    n_random: int = 20
    z_random: float = 3.0
    topk_fractions: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    confirm_fraction: float = 1e-3
    scales: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0)
    n_strongest: int = 3
    mask_ratio: float = 0.15
    strata_columns: tuple[str, ...] = ("Overall AD neuropathological Change", "Braak")
    max_cells: int = 1000
    batch_size: int = 32
    max_seq_len: int = 256
    n_top_genes: int = 20
    seed: int = 0

    def __post_init__(self):
        self.topk_fractions = tuple(float(f) for f in self.topk_fractions)
        self.scales = tuple(float(s) for s in self.scales)
        self.strata_columns = tuple(self.strata_columns)
        if self.n_random < 2 or self.n_strongest < 1 or self.n_top_genes < 1:
            raise UserError(
                f"ablation needs n_random >= 2 (for a standard deviation), n_strongest >= 1 and "
                f"n_top_genes >= 1 (got {self.n_random}, {self.n_strongest}, {self.n_top_genes})"
            )
        if not self.topk_fractions or not all(0 < f < 1 for f in self.topk_fractions):
            raise UserError(f"topk_fractions must be in (0, 1), got {list(self.topk_fractions)}")
        if self.confirm_fraction not in self.topk_fractions:
            raise UserError(
                f"confirm_fraction {self.confirm_fraction} must be one of topk_fractions "
                f"{list(self.topk_fractions)}"
            )
        if not self.scales or not all(math.isfinite(s) for s in self.scales):
            raise UserError(f"scales must be a non-empty list of numbers, got {self.scales}")
        if self.z_random < 0 or not 0 <= self.mask_ratio < 1:
            raise UserError(
                f"z_random must be >= 0 and mask_ratio in [0, 1) "
                f"(got {self.z_random}, {self.mask_ratio})"
            )
        if self.max_cells < 1 or self.batch_size < 1 or self.max_seq_len < 2:
            raise UserError("max_cells and batch_size must be >= 1, max_seq_len >= 2")


@dataclass
class AblationResult:
    """Tables of one ablation run (see `write_outputs` for the files)."""

    collapse: pd.DataFrame
    controls: pd.DataFrame
    scaling: pd.DataFrame
    shift: pd.DataFrame
    strata: pd.DataFrame
    confirmed: pd.DataFrame
    summary: dict


# --- the model from a given layer ------------------------------------------------------


def embed(model: ScGPTModel, gene_ids: Tensor, values: Tensor) -> Tensor:
    """Hidden states entering layer 0: gene embedding + value embedding."""
    gene_emb = model.encoder(gene_ids)
    return gene_emb + model.value_encoder(values.to(gene_emb.dtype))


def run_layers(
    model: ScGPTModel, hidden: Tensor, padding_mask: Tensor, start: int, stop: int | None = None
) -> Tensor:
    """Run encoder layers start..stop-1 (stop None = to the end) on `hidden`."""
    keep = ~padding_mask.bool()[:, None, None, :]
    for layer in model.transformer_encoder.layers[start:stop]:
        hidden = layer(hidden, keep)
    return hidden


def forward_from(
    model: ScGPTModel,
    hidden: Tensor,
    padding_mask: Tensor,
    start_layer: int,
    gene_emb: Tensor | None = None,
    heads: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """`ScGPTModel.forward` continued from the hidden states entering `start_layer`.

    Returns the same keys; "mvc" needs `gene_emb` (the gene encoder's output). `heads`
    limits which of "expr", "cls_logits", "mvc" are computed (None: all the model has).
    """
    return model.decode(run_layers(model, hidden, padding_mask, start_layer), gene_emb, heads)


# --- conditions -------------------------------------------------------------------------


@dataclass
class Edit:
    """Multiply weights `param[rows, cols]` by `factor` (0 = prune)."""

    param: str
    rows: np.ndarray
    cols: np.ndarray
    factor: float = 0.0


@dataclass
class Condition:
    """One model variant: weight edits and, optionally, a restored activation channel."""

    name: str
    kind: str
    candidate: str = ""
    edits: list[Edit] = field(default_factory=list)
    restore: tuple[str, int, str] | None = None  # (module, output channel, "all" | "spike")
    draw: int | None = None
    factor: float = math.nan
    k: int | None = None

    @property
    def start(self) -> int:
        """Lowest encoder layer the condition touches (where a cached run starts)."""
        names = [e.param for e in self.edits] + ([self.restore[0] + "."] if self.restore else [])
        return min((_layer_of(n) for n in names), default=0)

    @property
    def n_pruned(self) -> int:
        return int(sum(len(e.rows) for e in self.edits if e.factor == 0))

    @property
    def weights(self) -> str:
        if len(self.edits) != 1 or len(self.edits[0].rows) != 1:
            return ""
        e = self.edits[0]
        return f"{e.param}[{int(e.rows[0])}, {int(e.cols[0])}]"


def _layer_of(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else 0


@dataclass
class Target:
    """A candidate under test: `module.weight[row, col]`."""

    module: str
    layer: int
    row: int
    col: int
    weight: float
    accepted: bool
    source: str

    @property
    def id(self) -> str:
        return f"L{self.layer}[{self.row},{self.col}]"

    @property
    def param(self) -> str:
        return f"{self.module}.weight"


def _single(param: str, row: int, col: int, factor: float = 0.0) -> list[Edit]:
    return [Edit(param, np.array([row]), np.array([col]), factor)]


def _random_positions(shape, n, rng, exclude, row=None, col=None) -> list[tuple[int, int]]:
    """Up to n distinct (row, col) of a matrix, not in `exclude`; row or col may be fixed."""
    rows = np.arange(shape[0]) if row is None else np.array([row])
    cols = np.arange(shape[1]) if col is None else np.array([col])
    size = len(rows) * len(cols)
    picked = []
    for flat in rng.permutation(size) if size <= 1 << 22 else rng.integers(0, size, 4 * n + 64):
        pos = (int(rows[flat // len(cols)]), int(cols[flat % len(cols)]))
        if pos not in exclude and pos not in picked:
            picked.append(pos)
            if len(picked) == n:
                break
    return picked


def topk_counts(model: ScGPTModel, fractions: Sequence[float]) -> dict[float, int]:
    """k per fraction of the encoder's linear weights (2-D parameters), at least 1."""
    total = sum(p.numel() for p in model.transformer_encoder.parameters() if p.ndim == 2)
    return {f: max(1, round(f * total)) for f in fractions}


def _largest_weights(model: ScGPTModel, k: int, exclude: set[tuple[str, int, int]]) -> list:
    """(param, row, col) of the k largest-|w| encoder linear weights, strongest first."""
    params = [
        (f"transformer_encoder.{n}", p)
        for n, p in model.transformer_encoder.named_parameters()
        if p.ndim == 2
    ]
    mags = torch.cat([p.detach().abs().flatten().float().cpu() for _, p in params])
    starts = np.cumsum([0] + [p.numel() for _, p in params])
    offset = {name: (int(s), p.shape[1]) for (name, p), s in zip(params, starts, strict=False)}
    for name, row, col in exclude:
        if name in offset:
            mags[offset[name][0] + row * offset[name][1] + col] = -1.0
    found = []
    for flat in torch.topk(mags, min(k, mags.numel())).indices.tolist():
        i = int(np.searchsorted(starts, flat, side="right")) - 1
        within = flat - int(starts[i])
        found.append((params[i][0], *divmod(within, params[i][1].shape[1])))
    return found


def _grouped(weights: list) -> list[Edit]:
    by_param: dict[str, list] = {}
    for name, row, col in weights:
        by_param.setdefault(name, []).append((row, col))
    return [
        Edit(n, np.array([r for r, _ in rc]), np.array([c for _, c in rc]))
        for n, rc in by_param.items()
    ]


def build_conditions(model: ScGPTModel, targets: list[Target], settings: AblateSettings):
    """All conditions of the test, the original first; also returns the top-k per fraction."""
    params = dict(model.named_parameters())
    exclude = {(t.param, t.row, t.col) for t in targets}
    conditions = [Condition("original", "original")]
    accepted = [t for t in targets if t.accepted]
    if len(accepted) >= 2:
        edits = [e for t in accepted for e in _single(t.param, t.row, t.col)]
        conditions.append(Condition("prune all accepted", "prune_all", "all accepted", edits))
    ks = topk_counts(model, settings.topk_fractions)
    largest = _largest_weights(model, max(ks.values()), exclude)
    for k in sorted(set(ks.values())):
        edits = _grouped(largest[:k])
        conditions.append(Condition(f"top-{k} pruned, candidates kept", "topk", edits=edits, k=k))
    for index, t in enumerate(targets):
        rng = np.random.default_rng([settings.seed, index])
        shape = params[t.param].shape
        mine = {(r, c) for p, r, c in exclude if p == t.param}
        cid = t.id
        conditions.append(Condition(f"prune {cid}", "prune", cid, _single(t.param, t.row, t.col)))
        for kind, fixed in (
            ("random", {}),
            ("same_row", {"row": t.row}),
            ("same_col", {"col": t.col}),
        ):
            positions = _random_positions(shape, settings.n_random, rng, mine, **fixed)
            for draw, (r, c) in enumerate(positions):
                name = f"{kind.replace('_', ' ')} {cid} #{draw}"
                conditions.append(Condition(name, kind, cid, _single(t.param, r, c), draw=draw))
        for mode, where in (("all", "all tokens"), ("spike", "spike token")):
            name = f"prune {cid}, activation restored on {where}"
            prune = _single(t.param, t.row, t.col)
            restore = (t.module, t.row, mode)
            conditions.append(Condition(name, f"restore_{mode}", cid, prune, restore=restore))
        for s in settings.scales:
            conditions.append(
                Condition(
                    f"scale {cid} x{s:g}", "scale", cid, _single(t.param, t.row, t.col, s), factor=s
                )
            )
    return conditions, ks


def select_targets(
    model: ScGPTModel, candidates: pd.DataFrame, settings: AblateSettings
) -> list[Target]:
    """Accepted candidates, else the `n_strongest` first rows, else the largest down-proj |w|."""
    frame = candidates.drop_duplicates(["module", "row", "col"])
    accepted = frame[frame["accepted"]]
    if len(accepted):
        rows, source = accepted, "probe: accepted"
    elif len(frame):
        rows, source = frame.head(settings.n_strongest), "probe: strongest spike, not accepted"
    else:
        log.warning("the candidates table is empty; testing the largest down-projection weights")
        return _largest_down_projection_weights(model, settings.n_strongest)
    targets = []
    for r in rows.itertuples(index=False):
        module, row, col = str(r.module), int(r.row), int(r.col)
        layer, value = candidate_weight(model, module, row, col, getattr(r, "weight", math.nan))
        accepted_flag = bool(r.accepted) and source == "probe: accepted"
        targets.append(Target(module, layer, row, col, value, accepted_flag, source))
    return targets


def candidate_weight(
    model: nn.Module,
    module: str,
    row: int,
    col: int,
    listed: float = math.nan,
    kind: str = "linear layer of this model's encoder",
) -> tuple[int, float]:
    """(layer, value) of `module.weight[row, col]`, checked against the candidates table.

    A module that is not an encoder linear layer, coordinates outside its weight, or a
    listed weight the model does not hold mean the table belongs to another checkpoint.
    """
    weight = getattr(dict(model.named_modules()).get(module), "weight", None)
    if not _LAYER.match(module + ".") or weight is None or weight.ndim != 2:
        raise UserError(
            f"candidate module {module!r} is not a {kind}; "
            "were the candidates found in another checkpoint?"
        )
    if not (0 <= row < weight.shape[0] and 0 <= col < weight.shape[1]):
        raise UserError(
            f"candidate {module}[{row}, {col}] is outside its weight of shape "
            f"{tuple(weight.shape)}; were the candidates found in another checkpoint?"
        )
    value = float(weight.detach()[row, col])
    listed = float(listed)
    if math.isfinite(listed) and abs(listed - value) > 1e-3 * max(1.0, abs(value)):
        raise UserError(
            f"candidate {module}[{row}, {col}] is listed as {listed:.6g} but the model holds "
            f"{value:.6g}; the candidates belong to another checkpoint"
        )
    return _layer_of(module + "."), value


def _largest_down_projection_weights(model: ScGPTModel, n: int) -> list[Target]:
    found = []
    for layer, linear in enumerate(model.down_projections()):
        w = linear.weight.detach()
        row, col = divmod(int(w.abs().argmax()), w.shape[1])
        module = f"transformer_encoder.layers.{layer}.linear2"
        source = "largest |w| of a down-projection (probe listed nothing)"
        found.append(Target(module, layer, row, col, float(w[row, col]), False, source))
    return sorted(found, key=lambda t: -abs(t.weight))[:n]


def read_candidates(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The probe's candidates table (TSV or frame); without `accepted` every row counts as one."""
    frame = source.copy() if isinstance(source, pd.DataFrame) else pd.read_csv(source, sep="\t")
    missing = [c for c in ("module", "layer", "row", "col") if c not in frame.columns]
    if missing:
        raise UserError(f"candidates table lacks column(s) {missing}; run the probe stage first")
    if "accepted" not in frame.columns:
        frame["accepted"] = True
    frame["accepted"] = (
        frame["accepted"]
        .map(lambda v: v if isinstance(v, bool | np.bool_) else str(v).strip().lower() == "true")
        .astype(bool)
    )
    return frame


# --- evaluation -------------------------------------------------------------------------


@dataclass
class _Pass:
    name: str
    values: str
    head: str


_CLS = _Pass("cls", "values", "cls_logits")
_EXPR = _Pass("expr", "masked_values", "expr")


@dataclass
class _Cursor:
    """Which batch and pass the forward hooks are looking at."""

    batch: int = 0
    pass_name: str = "cls"
    padding_mask: Tensor | None = None


@contextmanager
def _edited(params: Mapping[str, nn.Parameter], edits: list[Edit]) -> Iterator[None]:
    """Apply edits; afterwards every edited weight gets its saved value back, bit for bit."""
    saved = []
    try:
        with torch.no_grad():
            for e in edits:
                w = params[e.param]
                rows = torch.as_tensor(e.rows, device=w.device)
                cols = torch.as_tensor(e.cols, device=w.device)
                saved.append((w, rows, cols, w[rows, cols].clone()))
                w[rows, cols] = saved[-1][3] * e.factor
        yield
    finally:
        with torch.no_grad():
            for w, rows, cols, old in reversed(saved):
                w[rows, cols] = old


@contextmanager
def _hooks(modules, condition: Condition, channels, recorded: dict, cursor: _Cursor):
    """Record original channels (original condition) or write them back (restore)."""
    handles = []

    def recorder(module_name: str, row: int):
        def hook(module, args, output):
            key = (module_name, row, cursor.pass_name)
            recorded.setdefault(key, []).append(output[..., row].clone())

        return hook

    def restorer(module_name: str, row: int, mode: str):
        def hook(module, args, output):
            original = recorded[(module_name, row, cursor.pass_name)][cursor.batch]
            if mode == "all":
                output[..., row] = original
                return output
            spike = original.abs().masked_fill(cursor.padding_mask, -1.0).argmax(dim=1)
            cells = torch.arange(len(spike), device=spike.device)
            output[cells, spike, row] = original[cells, spike]
            return output

        return hook

    try:
        if condition.kind == "original":
            for name, row in channels:
                handles.append(modules[name].register_forward_hook(recorder(name, row)))
        if condition.restore:
            name, row, mode = condition.restore
            handles.append(modules[name].register_forward_hook(restorer(name, row, mode)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def evaluate_conditions(
    model: ScGPTModel, batches: list[dict[str, Tensor]], conditions: list[Condition], cache=True
) -> Iterator[tuple[Condition, np.ndarray, np.ndarray | None]]:
    """Yield (condition, log p(class) [N, C], expression at masked positions [M] or None).

    With `cache`, the hidden states entering a condition's lowest touched layer are computed
    once (conditions run in order of that layer) and only later layers rerun; without it
    every condition runs the whole model from the inputs. The original must come first.
    """
    if conditions[0].kind != "original":
        raise ValueError("the original condition must come first")
    passes = [_CLS, _EXPR] if "masked_values" in batches[0] else [_CLS]
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    channels = sorted({c.restore[:2] for c in conditions if c.restore})
    recorded: dict = {}
    cursor = _Cursor()
    states, at = {}, 0
    if cache:
        for p in passes:
            states[p.name] = [embed(model, b["gene_ids"], b[p.values]) for b in batches]
    order = sorted(conditions, key=lambda c: c.start) if cache else conditions
    for condition in order:
        start = condition.start if cache else 0
        if start > at:
            for p in passes:
                states[p.name] = [
                    run_layers(model, h, b["padding_mask"], at, start)
                    for h, b in zip(states[p.name], batches, strict=True)
                ]
            at = start
        outputs = {p.name: [] for p in passes}
        with (
            _edited(params, condition.edits),
            _hooks(modules, condition, channels, recorded, cursor),
        ):
            for i, batch in enumerate(batches):
                for p in passes:
                    cursor.batch, cursor.pass_name = i, p.name
                    cursor.padding_mask = batch["padding_mask"]
                    hidden = (
                        states[p.name][i]
                        if cache
                        else embed(model, batch["gene_ids"], batch[p.values])
                    )
                    out = forward_from(model, hidden, batch["padding_mask"], start, heads=[p.head])
                    out = out[p.head]
                    outputs[p.name].append(out[batch["mask"]] if p is _EXPR else out)
        logp = torch.log_softmax(torch.cat(outputs["cls"]).double(), dim=1).cpu().numpy()
        expr = torch.cat(outputs["expr"]).double().cpu().numpy() if "expr" in outputs else None
        yield condition, logp, expr


# --- measures ---------------------------------------------------------------------------


class _Measures:
    """Per-condition measures, strata and prediction shifts relative to the original."""

    def __init__(self, batches, classes, strata, settings, gene_names):
        self.classes = list(classes)
        self.labels = torch.cat([b["labels"] for b in batches]).cpu().numpy()
        self.strata = strata
        self.settings = settings
        self.gene_names = gene_names or {}
        if "masked_values" in batches[0]:
            self.target = (
                torch.cat([b["values"][b["mask"]] for b in batches]).double().cpu().numpy()
            )
            tokens = torch.cat([b["gene_ids"][b["mask"]] for b in batches]).cpu().numpy()
            self.genes, self.gene_index = np.unique(tokens, return_inverse=True)
            self.gene_counts = np.bincount(self.gene_index, minlength=len(self.genes))
        self.rows, self.strata_rows, self.shift_rows = [], [], []
        self.original: dict | None = None

    def add(self, c: Condition, logp: np.ndarray, expr: np.ndarray | None) -> None:
        ll = logp[np.arange(len(self.labels)), self.labels]
        correct = logp.argmax(axis=1) == self.labels
        metrics = classification_metrics(logp, self.labels, self.classes)
        per_type = [ll[self.labels == i].mean() for i in np.unique(self.labels)]
        row = {
            "condition": c.name,
            "kind": c.kind,
            "candidate": c.candidate,
            "draw": c.draw,
            "factor": c.factor,
            "k": c.k,
            "weights": c.weights,
            "n_pruned": c.n_pruned,
            "start_layer": c.start,
            "log_likelihood": float(ll.mean()),
            "macro_log_likelihood": float(np.mean(per_type)),
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
        }
        probs = np.exp(logp).mean(axis=0)
        gene_means = None
        if expr is not None:
            squared = (expr - self.target) ** 2
            if self.original is None:
                self.variance = max(float(squared.mean()), 1e-12)
            row["expr_mse"] = float(squared.mean())
            row["expr_gaussian_ll"] = float(
                -0.5 * (math.log(2 * math.pi * self.variance) + squared.mean() / self.variance)
            )
            gene_means = np.bincount(self.gene_index, weights=expr) / self.gene_counts
        if self.original is None:
            self.original = {**row, "probs": probs, "genes": gene_means, "strata": {}}
        ref = self.original
        row["collapse"] = ref["log_likelihood"] - row["log_likelihood"]
        row["macro_collapse"] = ref["macro_log_likelihood"] - row["macro_log_likelihood"]
        if expr is not None:
            row["expr_ll_drop"] = ref["expr_gaussian_ll"] - row["expr_gaussian_ll"]
        self.rows.append(row)
        self._add_strata(c, ll, correct)
        if c.kind in _SHIFT_KINDS:
            self._add_shift(c, probs, gene_means)

    def _add_strata(self, c: Condition, ll: np.ndarray, correct: np.ndarray) -> None:
        for column, value, cells in self.strata:
            mean = float(ll[cells].mean())
            reference = self.original["strata"].setdefault((column, value), mean)
            self.strata_rows.append(
                {
                    "condition": c.name,
                    "kind": c.kind,
                    "candidate": c.candidate,
                    "stratum": column,
                    "value": value,
                    "n_cells": int(len(cells)),
                    "log_likelihood": mean,
                    "collapse": reference - mean,
                    "accuracy": float(correct[cells].mean()),
                }
            )

    def _add_shift(self, c: Condition, probs: np.ndarray, gene_means: np.ndarray | None) -> None:
        base = {"condition": c.name, "kind": c.kind, "candidate": c.candidate}
        for name, before, after in zip(self.classes, self.original["probs"], probs, strict=True):
            self.shift_rows.append(base | _shift("class", name, before, after, len(self.labels)))
        if gene_means is None or c.kind not in _GENE_SHIFT_KINDS:
            return
        gain = gene_means - self.original["genes"]
        for i in np.argsort(-gain, kind="stable")[: self.settings.n_top_genes]:
            token = int(self.genes[i])
            name = self.gene_names.get(token, str(token))
            before, after = self.original["genes"][i], gene_means[i]
            self.shift_rows.append(
                base | _shift("gene", name, before, after, int(self.gene_counts[i]))
            )


def _shift(what: str, name: str, before: float, after: float, n: int) -> dict:
    return {
        "what": what,
        "name": name,
        "original": float(before),
        "pruned": float(after),
        "change": float(after - before),
        "ratio": float(after / before) if before else math.nan,
        "n": n,
    }


# --- controls and decisions -------------------------------------------------------------


def _z(value: float, mean: float, sd: float) -> float:
    if sd > 0:
        return (value - mean) / sd
    return math.copysign(math.inf, value - mean) if value != mean else 0.0


def _controls(collapse: pd.DataFrame, targets: list[Target]) -> pd.DataFrame:
    """One row per candidate and control: its drops (mean, sd), z of the candidate, recovery."""
    rows = []
    topk = collapse[collapse["kind"] == "topk"]
    for t in targets:
        own = collapse[collapse["candidate"] == t.id]
        drop = float(own.loc[own["kind"] == "prune", "collapse"].iloc[0])
        groups = [(kind, own[own["kind"] == kind], None) for kind in _CONTROL_KINDS]
        groups += [(f"top-{r.k}", topk[topk["k"] == r.k], r.k) for r in topk.itertuples()]
        for control, part, k in groups:
            drops, n = part["collapse"], len(part)
            mean = float(drops.mean())
            sd = float(drops.std(ddof=1)) if n > 1 else math.nan
            restored = control.startswith("restore") and drop > 0
            rows.append(
                {
                    "candidate": t.id,
                    "control": control,
                    "k": k,
                    "n": n,
                    "log_likelihood_mean": float(part["log_likelihood"].mean()),
                    "log_likelihood_sd": float(part["log_likelihood"].std(ddof=1))
                    if n > 1
                    else math.nan,
                    "collapse_mean": mean,
                    "collapse_sd": sd,
                    "candidate_collapse": drop,
                    "z": _z(drop, mean, sd) if n > 1 else math.nan,
                    "recovered": (drop - mean) / drop if restored else math.nan,
                }
            )
    return pd.DataFrame(rows).astype({"k": "Int64"})


def _decide(t: Target, controls: pd.DataFrame, k: int, settings: AblateSettings) -> dict:
    own = controls[controls["candidate"] == t.id].set_index("control")
    random, top = own.loc["random"], own.loc[f"top-{k}"]
    drop, mean, sd = random["candidate_collapse"], random["collapse_mean"], random["collapse_sd"]
    z, top_drop = random["z"], top["collapse_mean"]
    failures = []
    if not (drop > mean and z >= settings.z_random):
        failures.append(
            f"drop {drop:.4g} is {z:.2f} sd from the mean drop of {int(random['n'])} random "
            f"weights of the same matrix ({mean:.4g} +- {sd:.2g}; needs >= {settings.z_random:g})"
        )
    if not drop > top_drop:
        failures.append(
            f"drop {drop:.4g} does not exceed pruning the top-{k} weights ({top_drop:.4g})"
        )
    reason = (
        f"confirmed: pruning lowers mean log p(true type) by {drop:.4g}, {z:.1f} sd above "
        f"{int(random['n'])} random weights of the same matrix (needs {settings.z_random:g}) "
        f"and more than pruning the top-{k} weights ({top_drop:.4g})"
        if not failures
        else "rejected: " + "; ".join(failures)
    )
    return {
        "candidate": t.id,
        "module": t.module,
        "layer": t.layer,
        "row": t.row,
        "col": t.col,
        "weight": t.weight,
        "probe_accepted": t.accepted,
        "source": t.source,
        "collapse": drop,
        "random_mean": mean,
        "random_sd": sd,
        "z_random": z,
        "topk_k": k,
        "topk_collapse": top_drop,
        "restore_recovered": own.loc["restore_all", "recovered"],
        "restore_spike_recovered": own.loc["restore_spike", "recovered"],
        "confirmed": not failures,
        "reason": reason,
    }


# --- entry points -----------------------------------------------------------------------


def fixed_batches(loader, mask_ratio: float, seed: int, device) -> list[dict[str, Tensor]]:
    """Materialise the loader's batches on `device`, with one fixed value mask per batch."""
    batches = []
    for i, batch in enumerate(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        if mask_ratio > 0:
            mask_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            batch["masked_values"], batch["mask"] = mask_values(
                batch["values"], batch["padding_mask"], mask_ratio, mask_seed
            )
        batches.append(batch)
    if not batches:
        raise UserError("no test cells to evaluate; the test split is empty")
    return batches


def _strata(labels, classes, obs: pd.DataFrame | None, columns) -> list:
    groups = [(CELL_TYPE, classes[i], np.flatnonzero(labels == i)) for i in np.unique(labels)]
    for column in columns:
        if obs is None or column not in obs.columns:
            log.info("no obs column %r: no strata by it", column)
            continue
        values = obs[column].to_numpy()
        present = pd.notna(values)
        for value in pd.unique(values[present]):
            groups.append((column, str(value), np.flatnonzero(present & (values == value))))
    return groups


def run_ablation(
    model: ScGPTModel,
    batches: list[dict[str, Tensor]],
    classes: Sequence[str],
    candidates: pd.DataFrame,
    settings: AblateSettings,
    obs: pd.DataFrame | None = None,
    gene_names: Mapping[int, str] | None = None,
    cache: bool = True,
) -> AblationResult:
    """Prune the candidates and their controls on fixed batches and judge each candidate.

    `batches` come from `fixed_batches` (with "labels"; with "masked_values"/"mask" for
    the expression measures); `obs` holds the cells' metadata in batch order for strata;
    `candidates` is a `read_candidates` table. The model's weights and mode are restored.
    """
    targets = select_targets(model, candidates, settings)
    conditions, ks = build_conditions(model, targets, settings)
    labels = torch.cat([b["labels"] for b in batches]).cpu().numpy()
    if obs is not None and len(obs) != len(labels):
        raise ValueError(f"obs has {len(obs)} rows for {len(labels)} cells")
    measures = _Measures(
        batches, classes, _strata(labels, list(classes), obs, settings.strata_columns),
        settings, gene_names,
    )  # fmt: skip
    log.info(
        "ablation: %d candidate(s), %d conditions, %d cells",
        len(targets),
        len(conditions),
        len(labels),
    )
    was_training = model.training
    model.eval()
    try:
        results = evaluate_conditions(model, batches, conditions, cache)
        for condition, logp, expr in tqdm(
            results, total=len(conditions), desc="ablate", leave=False
        ):
            measures.add(condition, logp, expr)
    finally:
        model.train(was_training)
    order = {c.name: i for i, c in enumerate(conditions)}
    collapse = _in_order(measures.rows, order).astype({"draw": "Int64", "k": "Int64"})
    controls = _controls(collapse, targets)
    k = ks[settings.confirm_fraction]
    confirmed = pd.DataFrame([_decide(t, controls, k, settings) for t in targets])
    for row in confirmed.itertuples():
        log.info("%s: %s", row.candidate, row.reason)
    scaling = collapse.loc[collapse["kind"] == "scale"].drop(columns=["draw", "k", "weights"])
    original = measures.original
    summary = {
        "n_cells": int(len(labels)),
        "n_conditions": len(conditions),
        "cached": cache,
        "original": {key: original[key] for key in _MEASURES if key in original},
        "topk": {str(f): n for f, n in ks.items()},
        "confirmed": confirmed.loc[confirmed["confirmed"], "candidate"].tolist(),
        "decisions": dict(zip(confirmed["candidate"], confirmed["reason"], strict=True)),
        "settings": asdict(settings),
    }
    return AblationResult(
        collapse=collapse,
        controls=controls,
        scaling=scaling.reset_index(drop=True),
        shift=_in_order(measures.shift_rows, order),
        strata=_in_order(measures.strata_rows, order),
        confirmed=confirmed,
        summary=summary,
    )


def _in_order(rows: list[dict], order: dict[str, int]) -> pd.DataFrame:
    """Rows as a table, sorted (stably) by the conditions' order of construction."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values("condition", key=lambda s: s.map(order), kind="stable").reset_index(
        drop=True
    )


def ablate(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    candidates: str | Path | pd.DataFrame,
    settings: AblateSettings,
    device: str | torch.device | None = None,
) -> AblationResult:
    """Run the ablation test of a fine-tuned checkpoint on (up to `max_cells`) test cells."""
    test = load_test_cells(
        tokenised,
        checkpoint,
        batch_size=settings.batch_size,
        max_seq_len=settings.max_seq_len,
        seed=settings.seed,
        max_cells=settings.max_cells,
        device=device,
    )
    batches = fixed_batches(test.loader, settings.mask_ratio, settings.seed, test.device)
    names = {i: g for g, i in test.vocab.items()}
    return run_ablation(
        test.model,
        batches,
        test.classes,
        read_candidates(candidates),
        settings,
        test.obs,
        names,
    )


OUTPUT_TABLES = ("collapse", "controls", "scaling", "shift", "strata", "confirmed")


def write_outputs(result: AblationResult, out_dir: str | Path) -> list[Path]:
    """Write the six tables as `<name>.tsv` and `summary.json` to `out_dir`, each atomically."""
    out = Path(out_dir)
    paths = [write_tsv(out / f"{name}.tsv", getattr(result, name)) for name in OUTPUT_TABLES]
    return [*paths, write_json(out / "summary.json", result.summary)]
