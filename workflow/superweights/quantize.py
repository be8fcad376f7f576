"""Round-to-nearest quantization as Yu et al. (2024, §5) measure it: three weight arms, W8A8.

Weights: asymmetric min/max quantization per contiguous block of ``block_size`` elements
of the flattened tensor (the paper's "128×128" block is 16,384 consecutive elements;
``"tensor"`` makes one block of the whole tensor). Each block keeps its minimum and step
in full precision, so ``q(w) = min + step · round((w - min) / step)`` with
``step = (max - min) / (2^bits - 1)`` (llama.cpp's Q4_1 layout): every value is within
half a step of its block, the block's minimum is exact and a constant block is exact.

The arms of the paper's Tables 3-4 (`ARMS`): "naive" quantizes every tensor as it is;
"clip" clamps the outliers of every quantized tensor (or, with ``clip_scope="super"``, of
the tensors holding a super weight) at one threshold of a sweep, then quantizes;
"clip_restore" does the same and puts the super weights back in full precision. Clip-only
separates the gain from clipping from the gain from restoring the super weight; the control
arm "clip_control" restores, instead of each super weight, the largest other weight of its
matrix, so that a gain of "clip_restore" over it is specific to the super weight.

Evidence, not point estimates: each clip arm's threshold is chosen on other cells (the
validation split; `selection_log_likelihood`) and evaluated on the test cells; the
differences between arms (`CONTRASTS`, and W8A8 holdout vs naive) are paired per cell, with
a percentile bootstrap CI over donors (`Quantization.contrasts`).

Activations (W8A8): weights INT8 symmetric per output channel (or per tensor), and the
input of every linear map of the encoder (q/k/v, attention output, MLP up and down)
fake-quantized to INT8 with an absmax scale per token or per tensor, taken over real
tokens only (padding excluded). The holdout keeps the single super activation in full
precision and out of the absmax: in each cell, the element at the spike token (where the
down-projection's input channel ``col`` peaks) and channel ``col`` of that input, and,
with ``hold_out_residual``, the element at the same token and residual channel ``row`` in
the inputs of later layers' self-attention and MLP up-projection, where the residual
stream carries the output spike.

Every evaluation runs in true fp32: no autocast and no TF32 on a GPU, so the unquantized
row and every full-precision part (restored weights, held-out activations) are fp32.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .confirm import bootstrap_mean_ci
from .data.preprocess import read_tokenised
from .editing import evaluation, layer_of, read_table
from .errors import UserError
from .model.cells import cell_batches, sample_rows
from .model.finetuned import load_test_cells
from .model.train import classification_metrics
from .outputs import named_paths, write_tsv
from .quantize_table import ARMS, COLUMNS, CONTRAST_COLUMNS, CONTRASTS, MEASURES
from .settings import QuantizeSettings, check_block_size, check_choice, check_clip

log = logging.getLogger(__name__)

ENCODER_PREFIX = "transformer_encoder."
HEAD_PREFIXES = ("decoder.", "cls_decoder.", "mvc_decoder.")
SUPER_WEIGHT_COLUMNS = ("module", "layer", "row", "col")

Quantizer = Callable[[str, Tensor], tuple[Tensor, int]]


# --- tensors ----------------------------------------------------------------------------


def quantize_dequantize(w: Tensor, bits: int, block_size: int | str = "tensor") -> Tensor:
    """Asymmetric min/max round-to-nearest per block of consecutive elements, dequantized.

    The last block of a tensor whose size `block_size` does not divide is shorter.
    """
    check_block_size(block_size)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    size = n if block_size == "tensor" else min(int(block_size), n)
    pad = -n % size
    blocks = torch.cat([flat, flat[-1:].expand(pad)]).view(-1, size)
    low = blocks.min(dim=1, keepdim=True).values
    step = (blocks.max(dim=1, keepdim=True).values - low) / (2**bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = low + step * torch.round((blocks - low) / step)
    return q.reshape(-1)[:n].view_as(w).to(w.dtype)


def clip_outliers(w: Tensor, clip: str = "zscore", clip_value: float = 6.0) -> Tensor:
    """`w` with outliers clamped: beyond mean ± clip_value·std ("zscore"), or beyond the
    (1 - clip_value) quantile of |w| ("fraction")."""
    check_clip(clip, clip_value)
    x = w.detach().float()
    if clip == "zscore":
        mean, std = x.mean(), x.std()
        low, high = mean - clip_value * std, mean + clip_value * std
    else:
        k = max(1, round((1 - clip_value) * x.numel()))
        high = x.abs().reshape(-1).kthvalue(k).values
        low = -high
    return x.clamp(low, high).to(w.dtype)


def quantize_weight(
    w: Tensor,
    bits: int,
    block_size: int | str,
    arm: str,
    super_coords=(),
    clip: str = "zscore",
    clip_value: float = 6.0,
) -> tuple[Tensor, int]:
    """`w` quantized by `arm` (see `ARMS`) and how many of its weights clipping changed.

    "clip_restore" (and "clip_control", given the control's coordinates) puts the weights
    at `super_coords` [(row, col)] back unchanged.
    """
    check_choice("arm", arm, ARMS)
    x = w.detach() if arm == "naive" else clip_outliers(w, clip, clip_value)
    q = quantize_dequantize(x, bits, block_size)
    if arm in ("clip_restore", "clip_control"):
        for row, col in super_coords:
            q[row, col] = w.detach()[row, col]
    return q, int((x != w).sum())


def quantize_symmetric(w: Tensor, bits: int = 8, per_channel: bool = True) -> Tensor:
    """Symmetric absmax round-to-nearest per output row (or per tensor), dequantized."""
    x = w.detach().float()
    absmax = x.abs().amax(dim=1, keepdim=True) if per_channel else x.abs().amax()
    step = absmax / (2 ** (bits - 1) - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return (torch.round(x / step) * step).to(w.dtype)


def fake_quantize_activation(
    x: Tensor,
    bits: int = 8,
    per_token: bool = False,
    real: Tensor | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Symmetric INT absmax fake quantization of `x` [..., C], scale per token (last
    dimension) or per tensor.

    `real` [...] (True = real token) limits the absmax to real tokens; elements where
    `keep` (shaped like `x`) is True stay in full precision and do not enter the absmax.
    """
    levels = 2 ** (bits - 1) - 1
    y = x.float()
    counted = y.abs()
    if keep is not None:
        counted = counted.masked_fill(keep, 0)
    if real is not None:
        counted = counted.masked_fill(~real.unsqueeze(-1), 0)
    absmax = counted.amax(dim=-1, keepdim=True) if per_token else counted.amax()
    step = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
    q = torch.round(y / step).clamp(-levels, levels) * step
    if keep is not None:
        q = torch.where(keep, y, q)
    return q.to(x.dtype)


# --- models -----------------------------------------------------------------------------


def quantizable_weights(model: nn.Module, include_heads: bool = False) -> dict[str, nn.Parameter]:
    """Name -> weight of every linear map of the encoder (and of the decoders if asked):
    `nn.Linear` weights and the packed attention `in_proj_weight`."""
    prefixes = (ENCODER_PREFIX, *HEAD_PREFIXES) if include_heads else (ENCODER_PREFIX,)
    weights = {}
    for name, module in model.named_modules():
        if not name.startswith(prefixes):
            continue
        if isinstance(module, nn.Linear):
            weights[f"{name}.weight"] = module.weight
        elif isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
            weights[f"{name}.in_proj_weight"] = module.in_proj_weight
    if not weights:
        raise UserError(f"the model has no linear layer under {prefixes}; is it an scGPT model?")
    return weights


def read_super_weights(path: str | Path) -> pd.DataFrame:
    """The super weights of an ablation table: rows of tier "super weight", or, in a table
    without tiers, the rows with a true `confirmed`."""
    table = read_table(path, "super-weight table", (*SUPER_WEIGHT_COLUMNS, "confirmed"),
                       f"use the ablate stage's table ({path})")  # fmt: skip
    if "tier" in table:
        keep = table["tier"].astype(str) == "super weight"
    else:
        keep = table["confirmed"].astype(str).str.lower().isin(("true", "1"))
    return table[keep].reset_index(drop=True)


def super_weight_coords(model: nn.Module, super_weights: pd.DataFrame | None) -> dict:
    """Weight name -> [(row, col)] for every super weight, checked against the model."""
    coords: dict[str, list[tuple[int, int]]] = {}
    if super_weights is None:
        return coords
    params = dict(model.named_parameters())
    for sw in super_weights.itertuples():
        name = f"{sw.module}.weight"
        if name not in params or not (
            0 <= sw.row < params[name].shape[0] and 0 <= sw.col < params[name].shape[1]
        ):
            raise UserError(
                f"super weight {sw.module}[{sw.row}, {sw.col}] is not in the model; "
                "was the super-weight table made for another checkpoint?"
            )
        coords.setdefault(name, []).append((int(sw.row), int(sw.col)))
    return coords


def control_coords(model: nn.Module, coords: dict) -> dict:
    """Weight name -> [(row, col)] of the control arm: per super weight, the largest-|w|
    other weight of its matrix (none of the super weights, each taken once)."""
    params = dict(model.named_parameters())
    control = {}
    for name, own in coords.items():
        magnitude = params[name].detach().float().abs().cpu().clone()
        for row, col in own:
            magnitude[row, col] = -1.0
        flat = torch.topk(magnitude.flatten(), len(own)).indices.tolist()
        control[name] = [divmod(i, magnitude.shape[1]) for i in flat]
    return control


@dataclass
class WeightChange:
    """What quantizing did to the weights: relative Frobenius error ‖W − Q‖ / ‖W‖ over all
    quantized weights together, and the number of weights that clipping changed."""

    weight_error: float
    n_clipped: int


@contextmanager
def quantized_weights(
    model: nn.Module, quantize: Quantizer, include_heads: bool = False
) -> Iterator[WeightChange]:
    """Inside, each quantizable weight of `model` is replaced by ``quantize(name, w)[0]``;
    on exit every weight is restored bit for bit, also when the block fails."""
    weights = quantizable_weights(model, include_heads)
    saved = {name: w.detach().clone() for name, w in weights.items()}
    diff = total = 0.0
    n_clipped = 0
    try:
        with torch.no_grad():
            for name, w in weights.items():
                q, clipped = quantize(name, saved[name])
                diff += float((saved[name].float() - q.float()).square().sum())
                total += float(saved[name].float().square().sum())
                n_clipped += clipped
                w.copy_(q)
        yield WeightChange((diff / total) ** 0.5 if total > 0 else 0.0, n_clipped)
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(saved[name])


def rtn_quantizer(
    bits: int,
    block_size: int | str,
    arm: str,
    coords: dict | None = None,
    clip: str = "zscore",
    clip_value: float = 6.0,
    clip_scope: str = "all",
) -> Quantizer:
    """Blockwise RTN by `arm` for `quantized_weights`; `coords` from `super_weight_coords`
    (`control_coords` for "clip_control"). With `clip_scope` "super", tensors without a
    weight in `coords` are quantized naively."""
    coords = coords or {}

    def quantize(name: str, w: Tensor) -> tuple[Tensor, int]:
        scoped = arm if clip_scope == "all" or name in coords else "naive"
        return quantize_weight(w, bits, block_size, scoped, coords.get(name, ()), clip, clip_value)

    return quantize


def int8_quantizer(per_channel: bool = True) -> Quantizer:
    """Symmetric INT8 weights (per output channel or per tensor) for `quantized_weights`."""
    return lambda name, w: (quantize_symmetric(w, 8, per_channel), 0)


def activation_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module whose input enters a linear map of the encoder (self_attn's input is
    what `in_proj_weight` multiplies)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith(ENCODER_PREFIX)
        and (isinstance(module, nn.Linear) or hasattr(module, "in_proj_weight"))
    }


@dataclass(frozen=True)
class HeldOut:
    """One held-out activation element: channel `channel` of super activation `index`; the
    module where `locate` is set finds the spike token (argmax of |input[:, channel]|)."""

    index: int
    channel: int
    locate: bool


def super_activation_sites(
    model: nn.Module, super_weights: pd.DataFrame | None, hold_out_residual: bool = True
) -> dict[str, list[HeldOut]]:
    """Module name -> the super-activation elements held out of its input (W8A8 holdout).

    Per super weight: input channel `col` of its down-projection, at the token where that
    channel peaks; with `hold_out_residual`, residual channel `row` at the same token in
    the inputs of `self_attn` and `linear1` of every later layer.
    """
    if super_weights is None:
        return {}
    super_weight_coords(model, super_weights)
    sites: dict[str, list[HeldOut]] = {}
    inputs = activation_inputs(model)
    for index, sw in enumerate(super_weights.itertuples()):
        sites.setdefault(sw.module, []).append(HeldOut(index, int(sw.col), True))
        if not hold_out_residual:
            continue
        for name in inputs:
            later = (layer_of(name) or 0) > int(sw.layer)
            if later and name.endswith((".self_attn", ".linear1")):
                sites.setdefault(name, []).append(HeldOut(index, int(sw.row), False))
    return sites


@contextmanager
def activation_quantization(
    model: nn.Module,
    sites: dict[str, list[HeldOut]] | None = None,
    bits: int = 8,
    per_token: bool = False,
) -> Iterator[nn.Module]:
    """Fake-quantize the input of every encoder linear map while inside.

    The scale is taken over the real tokens of the batch (from the `padding_mask` given to
    the model's forward); `sites` (from `super_activation_sites`) are held out. Runs on
    padded batches; the hooks are removed on exit.
    """
    sites = sites or {}
    batch: dict = {}

    def start(module, args, kwargs):
        if kwargs.get("packing") is not None:
            raise ValueError("activation quantization needs padded batches, not packed ones")
        padding = kwargs["padding_mask"] if "padding_mask" in kwargs else args[2]
        batch.update(real=~padding.bool(), spikes={})

    def hook_for(held: list[HeldOut]):
        def hook(module, args):
            x, real = args[0], batch["real"]
            keep = None
            if held:
                keep = torch.zeros_like(x, dtype=torch.bool)
                cells = torch.arange(x.shape[0], device=x.device)
                for h in held:
                    if h.locate:
                        peak = x[..., h.channel].abs().masked_fill(~real, -1)
                        batch["spikes"][h.index] = peak.argmax(dim=1)
                    keep[cells, batch["spikes"][h.index], h.channel] = True
            return (fake_quantize_activation(x, bits, per_token, real, keep), *args[1:])

        return hook

    handles = [model.register_forward_pre_hook(start, with_kwargs=True)]
    try:
        for name, module in activation_inputs(model).items():
            handles.append(module.register_forward_pre_hook(hook_for(sites.get(name, []))))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# --- evaluation -------------------------------------------------------------------------


@contextmanager
def true_fp32(device: torch.device) -> Iterator[None]:
    """No autocast and no TF32 matmuls while inside; the previous flags are restored."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def measure(model: nn.Module, batches, classes: list[str]) -> dict:
    """Mean log p(true type), accuracy, macro F1 and cell count of the classifier, in true
    fp32, on padded batches (dicts with gene_ids, values, padding_mask and labels)."""
    return _evaluate(model, batches, classes)[0]


def _evaluate(model: nn.Module, batches, classes: list[str]) -> tuple[dict, dict]:
    """`measure`'s metrics, and per cell its log p(true type) and whether it is right."""
    first = next(model.parameters())
    if first.dtype != torch.float32:
        raise UserError(f"quantization compares against fp32; the model is {first.dtype}")
    logits, labels = [], []
    with evaluation(model), true_fp32(first.device):
        for batch in batches:
            gene_ids, values, padding = (
                batch[k].to(first.device) for k in ("gene_ids", "values", "padding_mask")
            )
            out = model(gene_ids, values, padding_mask=padding, heads=("cls_logits",))
            logits.append(out["cls_logits"].cpu())
            labels.append(batch["labels"].cpu())
    logits, labels = torch.cat(logits), torch.cat(labels)
    metrics = classification_metrics(logits.numpy(), labels.numpy(), classes)
    log_p = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
    per_cell = {
        "mean_log_likelihood": log_p.numpy(),
        "accuracy": (logits.argmax(1) == labels).double().numpy(),
    }
    keys = ("mean_log_likelihood", "accuracy", "macro_f1", "n_cells")
    return {k: metrics[k] for k in keys}, per_cell


@dataclass(frozen=True)
class _Case:
    """One setting: its table fields, its weight quantizer (None: unquantized) and, for
    W8A8, the held-out activation sites (None: weights only)."""

    fields: dict
    quantizer: Quantizer | None = None
    sites: dict | None = None


def _cases(model: nn.Module, super_weights, settings: QuantizeSettings) -> Iterator[_Case]:
    """The unquantized model, every arm × bits × block size (× clip value), then W8A8."""
    coords = super_weight_coords(model, super_weights)
    restore = {"clip_restore": coords, "clip_control": control_coords(model, coords)}
    yield _Case(dict(scheme="fp32", method="none", bits=32, block_size="none"))
    for bits in settings.bits:
        for block in settings.block_sizes:
            fields = dict(scheme="weight", bits=bits, block_size=str(block))
            yield _Case(fields | {"method": "naive"}, rtn_quantizer(bits, block, "naive"))
            for value in settings.clip_values:
                for arm in ARMS[1:]:
                    quantizer = rtn_quantizer(
                        bits, block, arm, restore.get(arm, coords), settings.clip, value,
                        settings.clip_scope,
                    )  # fmt: skip
                    yield _Case(fields | {"method": arm, "clip_value": value}, quantizer)
    if settings.w8a8:
        int8 = int8_quantizer(settings.w8a8_weights == "channel")
        sites = super_activation_sites(model, super_weights, settings.hold_out_residual)
        fields = dict(scheme="w8a8", bits=8, block_size=settings.w8a8_weights)
        fields["activation_scale"] = settings.activation_scale
        for method, held in (("naive", {}), ("holdout", sites)):
            yield _Case(fields | {"method": method}, int8, held)


def _fingerprint(model: nn.Module, include_heads: bool) -> str:
    """A digest of the quantizable weights as they are now."""
    digest = hashlib.blake2b(digest_size=16)
    for w in quantizable_weights(model, include_heads).values():
        digest.update(w.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _applied(model: nn.Module, case: _Case, settings: QuantizeSettings):
    """Inside, `model` runs as `case` says; yields its `WeightChange` and a key that is
    equal for cases whose forward passes are identical."""
    heads = settings.include_heads
    weights = (
        nullcontext(WeightChange(0.0, 0))
        if case.quantizer is None
        else quantized_weights(model, case.quantizer, heads)
    )
    per_token = settings.activation_scale == "token"
    activations = (
        nullcontext()
        if case.sites is None
        else activation_quantization(model, case.sites, 8, per_token)
    )
    with weights as change, activations:
        sites = None if case.sites is None else sorted((n, tuple(h)) for n, h in case.sites.items())
        yield change, (_fingerprint(model, heads), repr(sites), per_token)


@dataclass
class Quantization:
    """The table of every setting (`COLUMNS`) and the arms' paired differences with their
    donor bootstrap CIs (`CONTRAST_COLUMNS`)."""

    table: pd.DataFrame
    contrasts: pd.DataFrame


def run_quantization(
    model: nn.Module,
    batches,
    classes: list[str],
    super_weights: pd.DataFrame | None,
    settings: QuantizeSettings,
    *,
    selection_batches=None,
    donors=None,
    seed: int = 0,
) -> Quantization:
    """Evaluate the unquantized model, every arm × bits × block size (× clip value), and W8A8
    on `batches`, and the clip arms on `selection_batches` too (other cells, e.g.
    validation: each clip arm's threshold is the one with the best mean log p there; without
    them it is chosen on `batches`, and the log says so).

    `super_weights`: the super weights to hold out (module, layer, row, col), e.g. from
    `read_super_weights`; empty or None holds none out. `donors`: one label per evaluated
    cell, the groups of the contrasts' bootstrap (cells when None), seeded by `seed`.
    Settings whose quantized weights (and held-out activations) are identical are evaluated
    once: e.g. block sizes at or beyond every matrix's size (= "tensor"), a clip threshold
    that clips nothing (= naive), clip + restore with no super weight (= clip only), W8A8
    holdout with none to hold out (= naive). `model` ends as it started.
    """
    if selection_batches is None:
        log.warning("no selection cells: clip thresholds are chosen on the evaluated cells")
    rows, measured, selected, per_cell = [], {}, {}, []
    for case in _cases(model, super_weights, settings):
        with _applied(model, case, settings) as (change, key):
            if key not in measured:
                measured[key] = _evaluate(model, batches, classes)
            clipped = case.fields["method"] in ARMS[1:]
            if clipped and selection_batches is not None and key not in selected:
                selected[key] = measure(model, selection_batches, classes)["mean_log_likelihood"]
        row = dict(clip_value=np.nan, activation_scale="none") | case.fields
        row |= measured[key][0] | asdict(change)
        row["selection_log_likelihood"] = (
            selected[key] if clipped and selection_batches is not None
            else row["mean_log_likelihood"] if clipped else np.nan
        )  # fmt: skip
        measures = ", ".join(f"{k} {row[k]:.4f}" for k in MEASURES)
        log.info("%s: %s", ", ".join(f"{k} {v}" for k, v in case.fields.items()), measures)
        rows.append(row)
        per_cell.append(measured[key][1])
    n_super = 0 if super_weights is None else len(super_weights)
    log.info("%d settings, %d evaluated", len(rows), len(measured))
    table = pd.DataFrame(rows).assign(n_super_weights=n_super)[list(COLUMNS)]
    rng = np.random.default_rng(seed)
    contrasts = _contrasts(table, per_cell, donors, settings.n_boot, rng)
    return Quantization(table, contrasts)


def _contrasts(table: pd.DataFrame, per_cell: list[dict], donors, n_boot: int, rng):
    """Paired per-cell differences between arms (`CONTRASTS`, each clip arm at its chosen
    threshold) per bits × block size, and W8A8 holdout vs naive, with donor bootstrap CIs."""
    donors = None if donors is None else np.asarray(donors).astype(str)
    pairs = []
    for (bits, block), part in table[table["scheme"] == "weight"].groupby(
        ["bits", "block_size"], sort=False
    ):
        chosen = {arm: _chosen_row(part, arm) for arm in ARMS}
        for name, (arm, other) in CONTRASTS.items():
            if chosen[arm] is not None and chosen[other] is not None:
                value = table.loc[chosen[arm], "clip_value"]
                pairs.append(("weight", bits, block, name, value, chosen[arm], chosen[other]))
    w8a8 = table[table["scheme"] == "w8a8"]
    by_method = dict(zip(w8a8["method"], w8a8.index, strict=True))
    if {"naive", "holdout"} <= set(by_method):
        pairs.append(("w8a8", 8, w8a8["block_size"].iloc[0], "holdout vs naive", np.nan,
                      by_method["holdout"], by_method["naive"]))  # fmt: skip
    rows = []
    for scheme, bits, block, name, value, first, second in pairs:
        for measure_ in ("mean_log_likelihood", "accuracy"):
            diff = per_cell[first][measure_] - per_cell[second][measure_]
            low, high = bootstrap_mean_ci(diff, donors, n_boot, 0.95, rng)
            rows.append({
                "scheme": scheme, "bits": bits, "block_size": block, "contrast": name,
                "clip_value": value, "measure": measure_, "difference": float(diff.mean()),
                "ci_low": low, "ci_high": high, "n_cells": len(diff),
                "n_donors": len(set(donors)) if donors is not None else 0,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(CONTRAST_COLUMNS))


def _chosen_row(part: pd.DataFrame, arm: str):
    """Index (in the table) of `arm`'s row at its chosen threshold, or None."""
    own = part[part["method"] == arm]
    if own.empty:
        return None
    return own.index[0] if arm == "naive" else own["selection_log_likelihood"].idxmax()


def write_outputs(result: Quantization, outputs) -> Path:
    """Write the table (`quantize.tsv`) and the contrasts (`contrasts.tsv`) atomically;
    returns the table's path.

    `outputs`: a folder or the rule's named outputs with `table` and `contrasts`
    (`named_paths`).
    """
    paths = named_paths(outputs, {"table": "quantize.tsv", "contrasts": "contrasts.tsv"})
    write_tsv(paths["contrasts"], result.contrasts)
    return write_tsv(paths["table"], result.table)


def quantize_checkpoint(
    tokenised,
    checkpoint,
    super_weights,
    settings: QuantizeSettings,
    *,
    device=None,
) -> Quantization:
    """`run_quantization` of a fine-tuned checkpoint on its dataset's test cells, clip
    thresholds chosen on its validation cells, all cut as fine-tuning cut them (so that the
    unquantized row equals the fine-tuning test metrics); donors are the contrasts' groups."""
    adata = read_tokenised(tokenised)
    test = load_test_cells(
        adata, checkpoint, batch_size=settings.batch_size, seed=settings.seed, device=device
    )
    rows = sample_rows(adata.obs["split"].astype(str).to_numpy(), ["val"], None, settings.seed)
    validation = cell_batches(
        adata, test.vocab, rows, pad_token_id=test.config.pad_token_id,
        batch_size=settings.batch_size, max_seq_len=test.cut.max_seq_len, seed=test.cut.seed,
        labelled=True, device=test.device,
    )  # fmt: skip
    return run_quantization(
        test.model, test.batches, test.classes, read_super_weights(super_weights), settings,
        selection_batches=validation, donors=test.obs["donor"].astype(str).to_numpy(),
        seed=settings.seed,
    )  # fmt: skip


def run(inputs, outputs, settings: QuantizeSettings) -> Quantization:
    """The quantization stage: `quantize_checkpoint` of `inputs["checkpoint"]` on
    `inputs["data"]`, holding out `inputs["super_weights"]`; write the tables
    (`write_outputs`) and the figure (`quantize_plots.write_figures`) to `outputs`."""
    from .quantize_plots import write_figures

    result = quantize_checkpoint(
        inputs["data"], inputs["checkpoint"], inputs["super_weights"], settings
    )
    write_outputs(result, outputs)
    write_figures(result.table, outputs)
    return result
