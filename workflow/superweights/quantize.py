"""Round-to-nearest quantization with and without super-weight holdout (Yu et al. 2024, §5).

Weights: asymmetric min/max quantization per contiguous block of ``block_size`` elements
of the flattened tensor (the paper's "128×128" block is 16,384 consecutive elements;
``"tensor"`` makes one block of the whole tensor). Each block keeps its minimum and step
in full precision, so ``q(w) = min + step · round((w - min) / step)`` with
``step = (max - min) / (2^bits - 1)`` (llama.cpp's Q4_1 layout): every value is within
half a step of its block, the block's minimum is exact and a constant block is exact.
Holdout: clip the tensor's outliers, quantize, then put the super weights back in full
precision. By default only tensors holding a super weight are clipped, so that without
super weights holdout equals naive; ``clip_scope="all"`` clips every tensor as in the
paper's model-wide recipe.

Activations (W8A8): weights INT8 symmetric per output channel (or per tensor), and the
input of every linear map of the encoder (q/k/v, attention output, MLP up and down)
fake-quantized to INT8 per tensor with a dynamic absmax scale, padding positions
included. Holdout keeps whole channels in full precision and out of the absmax: the
down-projection's input channel ``col`` at the super weight's layer (the input spike),
and, unless disabled, the residual-stream channel ``row`` (the output spike, which the
residual carries into every later layer's q/k/v and MLP inputs).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from .errors import UserError
from .model.finetuned import load_test_cells
from .model.train import classification_metrics, evaluate
from .outputs import write_tsv

log = logging.getLogger(__name__)

ENCODER_PREFIX = "transformer_encoder."
HEAD_PREFIXES = ("decoder.", "cls_decoder.", "mvc_decoder.")
CLIP_METHODS = ("zscore", "fraction", "none")
SUPER_WEIGHT_COLUMNS = ("module", "layer", "row", "col")
MEASURES = ("mean_log_likelihood", "accuracy", "macro_f1", "weight_error")
COLUMNS = (
    "scheme",
    "method",
    "bits",
    "block_size",
    *MEASURES,
    "n_cells",
    "n_super_weights",
    "n_clipped",
)
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class QuantizeSettings:
    """Settings of the quantization stage.

    `block_sizes`: elements per block (ints) or "tensor". `clip`: how holdout clips
    outliers before quantizing: "zscore" (|w - mean| > clip_value · std of the tensor),
    "fraction" (the top clip_value share of |w|) or "none"; `clip_scope`: clip the tensors
    holding a super weight ("super") or every tensor ("all"). `include_heads`: also quantize
    the decoders' weights. `w8a8_weights`: "channel" or "tensor" INT8 weight scales.
    `hold_out_residual`: W8A8 holdout also keeps the super weight's output channel.
    """

    bits: list[int] = field(default_factory=lambda: [8, 4])
    block_sizes: list[int | str] = field(
        default_factory=lambda: [64, 256, 1024, 4096, 16384, 65536, "tensor"]
    )
    clip: str = "zscore"
    clip_value: float = 6.0
    clip_scope: str = "super"
    include_heads: bool = False
    w8a8: bool = True
    w8a8_weights: str = "channel"
    hold_out_residual: bool = True

    def __post_init__(self):
        if not self.bits or any(not isinstance(b, int) or not 2 <= b <= 8 for b in self.bits):
            raise UserError(f"quantize bits must be integers from 2 to 8, not {self.bits}")
        if not self.block_sizes:
            raise UserError("quantize block_sizes is empty; give e.g. [64, 1024, 'tensor']")
        for size in self.block_sizes:
            _check_block(size)
        _check_clip(self.clip, self.clip_value)
        if self.clip_scope not in ("super", "all"):
            raise UserError(f"clip_scope must be 'super' or 'all', not {self.clip_scope!r}")
        if self.w8a8_weights not in ("channel", "tensor"):
            raise UserError(
                f"w8a8_weights must be 'channel' or 'tensor', not {self.w8a8_weights!r}"
            )


def _check_block(block_size) -> None:
    if block_size == "tensor" or (isinstance(block_size, int) and block_size >= 1):
        return
    raise UserError(f"block size must be a positive integer or 'tensor', not {block_size!r}")


def _check_clip(clip: str, clip_value: float) -> None:
    if clip not in CLIP_METHODS:
        raise UserError(f"clip must be one of {CLIP_METHODS}, not {clip!r}")
    if clip == "zscore" and not clip_value > 0:
        raise UserError(f"zscore clipping needs clip_value > 0, not {clip_value}")
    if clip == "fraction" and not 0 < clip_value < 1:
        raise UserError(f"fraction clipping needs 0 < clip_value < 1, not {clip_value}")


# --- tensors ----------------------------------------------------------------------------


def quantize_dequantize(w: Tensor, bits: int, block_size: int | str = "tensor") -> Tensor:
    """Asymmetric min/max round-to-nearest per block of consecutive elements, dequantized.

    The last block of a tensor whose size `block_size` does not divide is shorter.
    """
    _check_block(block_size)
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
    """`w` with outliers clamped: beyond mean ± clip_value·std ("zscore"), beyond the
    (1 - clip_value) quantile of |w| ("fraction"), or unchanged ("none")."""
    _check_clip(clip, clip_value)
    if clip == "none":
        return w.detach().clone()
    x = w.detach().float()
    if clip == "zscore":
        mean, std = x.mean(), x.std()
        low, high = mean - clip_value * std, mean + clip_value * std
    else:
        k = max(1, round((1 - clip_value) * x.numel()))
        high = x.abs().reshape(-1).kthvalue(k).values
        low = -high
    return x.clamp(low, high).to(w.dtype)


def quantize_with_holdout(
    w: Tensor,
    bits: int,
    block_size: int | str,
    super_coords,
    clip: str = "zscore",
    clip_value: float = 6.0,
) -> Tensor:
    """Clip outliers, quantize per block, restore the weights at `super_coords` (row, col)."""
    q = quantize_dequantize(clip_outliers(w, clip, clip_value), bits, block_size)
    for row, col in super_coords:
        q[row, col] = w.detach()[row, col]
    return q


def quantize_symmetric(w: Tensor, bits: int = 8, per_channel: bool = True) -> Tensor:
    """Symmetric absmax round-to-nearest per output row (or per tensor), dequantized."""
    x = w.detach().float()
    absmax = x.abs().amax(dim=1, keepdim=True) if per_channel else x.abs().amax()
    step = absmax / (2 ** (bits - 1) - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return (torch.round(x / step) * step).to(w.dtype)


def fake_quantize_activation(x: Tensor, bits: int = 8, keep: list[int] | None = None) -> Tensor:
    """Symmetric INT absmax fake quantization over the whole tensor; the last-dimension
    channels in `keep` stay in full precision and do not enter the absmax."""
    levels = 2 ** (bits - 1) - 1
    y = x.float()
    scaled = y
    if keep:
        scaled = y.clone()
        scaled[..., keep] = 0
    absmax = scaled.abs().amax()
    step = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
    q = torch.round(y / step).clamp(-levels, levels) * step
    if keep:
        q[..., keep] = y[..., keep]
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
    """The confirmed super weights of an ablation table (TSV with a boolean `confirmed`)."""
    table = pd.read_csv(path, sep="\t")
    missing = [c for c in (*SUPER_WEIGHT_COLUMNS, "confirmed") if c not in table.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {missing}; use the ablate stage's table")
    confirmed = table["confirmed"].astype(str).str.lower().isin(("true", "1"))
    return table[confirmed].reset_index(drop=True)


def _super_coords(model: nn.Module, super_weights: pd.DataFrame | None) -> dict:
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


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    bits: int,
    block_size: int | str,
    holdout: bool,
    super_weights: pd.DataFrame | None = None,
    clip: str = "zscore",
    clip_value: float = 6.0,
    clip_scope: str = "super",
    include_heads: bool = False,
) -> nn.Module:
    """A copy of `model` with its linear weights quantized blockwise, the input untouched.

    With `holdout`, the tensors holding a super weight (every tensor if `clip_scope` is
    "all") are clipped before quantizing and the `super_weights` (table with module, row,
    col) are restored in full precision.
    """
    coords = _super_coords(model, super_weights if holdout else None)
    quantized = copy.deepcopy(model)
    for name, weight in quantizable_weights(quantized, include_heads).items():
        if holdout and (name in coords or clip_scope == "all"):
            q = quantize_with_holdout(
                weight, bits, block_size, coords.get(name, []), clip, clip_value
            )
        else:
            q = quantize_dequantize(weight, bits, block_size)
        weight.copy_(q)
    return quantized


@torch.no_grad()
def quantize_model_int8(
    model: nn.Module, per_channel: bool = True, include_heads: bool = False
) -> nn.Module:
    """A copy of `model` with its linear weights INT8 symmetric (per output channel)."""
    quantized = copy.deepcopy(model)
    for weight in quantizable_weights(quantized, include_heads).values():
        weight.copy_(quantize_symmetric(weight, 8, per_channel))
    return quantized


@torch.no_grad()
def weight_error(original: nn.Module, quantized: nn.Module, include_heads: bool = False) -> float:
    """Relative Frobenius error ‖W − Q‖ / ‖W‖ over all quantizable weights together."""
    q = quantizable_weights(quantized, include_heads)
    diff = total = 0.0
    for name, w in quantizable_weights(original, include_heads).items():
        diff += float((w.float() - q[name].float()).square().sum())
        total += float(w.float().square().sum())
    return (diff / total) ** 0.5 if total > 0 else 0.0


def activation_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module whose input enters a linear map of the encoder (self_attn's input is
    what `in_proj_weight` multiplies)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith(ENCODER_PREFIX)
        and (isinstance(module, nn.Linear) or hasattr(module, "in_proj_weight"))
    }


def held_out_channels(
    model: nn.Module, super_weights: pd.DataFrame | None, hold_out_residual: bool = True
) -> dict[str, list[int]]:
    """Module name -> input channels kept in full precision for the W8A8 holdout.

    Per super weight: input channel `col` of its down-projection, and with
    `hold_out_residual` channel `row` of the inputs of `self_attn` and `linear1` of
    every later layer (where the residual stream carries the output spike).
    """
    if super_weights is None:
        return {}
    _super_coords(model, super_weights)
    keep: dict[str, set[int]] = {}
    inputs = activation_inputs(model)
    for sw in super_weights.itertuples():
        keep.setdefault(sw.module, set()).add(int(sw.col))
        if not hold_out_residual:
            continue
        for name in inputs:
            layer = _LAYER.search(name)
            residual = name.endswith((".self_attn", ".linear1"))
            if residual and layer and int(layer.group(1)) > int(sw.layer):
                keep.setdefault(name, set()).add(int(sw.row))
    return {name: sorted(channels) for name, channels in keep.items()}


@contextmanager
def activation_quantization(
    model: nn.Module, keep: dict[str, list[int]] | None = None, bits: int = 8
) -> Iterator[nn.Module]:
    """Fake-quantize the input of every encoder linear map while inside; `keep` maps
    module names to channels held out. The hooks are removed on exit."""
    keep = keep or {}
    handles = []

    def hook_for(channels):
        def hook(module, args):
            return (fake_quantize_activation(args[0], bits, channels), *args[1:])

        return hook

    try:
        for name, module in activation_inputs(model).items():
            handles.append(module.register_forward_pre_hook(hook_for(keep.get(name))))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# --- the stage --------------------------------------------------------------------------


def _measure(model, loader, classes, device) -> dict:
    metrics = classification_metrics(*evaluate(model, loader, device), classes)
    return {k: metrics[k] for k in ("mean_log_likelihood", "accuracy", "macro_f1", "n_cells")}


def count_clipped(
    model: nn.Module, super_weights: pd.DataFrame | None, settings: QuantizeSettings
) -> int:
    """How many quantizable weights the holdout's clipping changes."""
    coords = _super_coords(model, super_weights)
    return sum(
        int((clip_outliers(w, settings.clip, settings.clip_value) != w).sum())
        for name, w in quantizable_weights(model, settings.include_heads).items()
        if name in coords or settings.clip_scope == "all"
    )


def run_quantization(
    model: nn.Module,
    loader,
    classes: list[str],
    super_weights: pd.DataFrame | None,
    settings: QuantizeSettings,
) -> pd.DataFrame:
    """Evaluate fp32, blockwise RTN (naive vs holdout) per bits and block size, and W8A8.

    `super_weights`: the super weights to hold out (module, layer, row, col), e.g. from
    `read_super_weights`; empty or None holds none out. One row per setting, `COLUMNS`;
    `n_clipped` counts the weights that the holdout's clipping changed.
    """
    device = next(model.parameters()).device
    heads = settings.include_heads
    keep = held_out_channels(model, super_weights, settings.hold_out_residual)
    n_clipped = count_clipped(model, super_weights, settings)
    rows = []

    def record(scheme, method, bits, block, quantized, error, clipped=0):
        row = dict(scheme=scheme, method=method, bits=bits, block_size=str(block))
        row |= _measure(quantized, loader, classes, device)
        row |= dict(weight_error=error, n_clipped=clipped)
        measures = ", ".join(f"{k} {row[k]:.4f}" for k in MEASURES)
        log.info("%s %s %d-bit block %s: %s", scheme, method, bits, block, measures)
        rows.append(row)

    record("fp32", "none", 32, "none", model, 0.0)
    for bits in settings.bits:
        for block in settings.block_sizes:
            for method in ("naive", "holdout"):
                holdout = method == "holdout"
                q = quantize_model(
                    model,
                    bits,
                    block,
                    holdout,
                    super_weights,
                    clip=settings.clip,
                    clip_value=settings.clip_value,
                    clip_scope=settings.clip_scope,
                    include_heads=heads,
                )
                error = weight_error(model, q, heads)
                record("weight", method, bits, block, q, error, n_clipped if holdout else 0)
    if settings.w8a8:
        q = quantize_model_int8(model, settings.w8a8_weights == "channel", heads)
        error = weight_error(model, q, heads)
        for method in ("naive", "holdout"):
            with activation_quantization(q, keep if method == "holdout" else None):
                record("w8a8", method, 8, settings.w8a8_weights, q, error)
    n_super = 0 if super_weights is None else len(super_weights)
    return pd.DataFrame(rows).assign(n_super_weights=n_super)[list(COLUMNS)]


def write_outputs(frame: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write `out_dir/quantize.tsv` atomically; returns its path."""
    return write_tsv(Path(out_dir) / "quantize.tsv", frame)


def quantize_checkpoint(
    tokenised,
    checkpoint,
    super_weights,
    settings: QuantizeSettings,
    *,
    batch_size: int,
    max_seq_len: int,
    seed: int,
    device=None,
) -> pd.DataFrame:
    """`run_quantization` of a fine-tuned checkpoint on its dataset's test cells."""
    test = load_test_cells(
        tokenised,
        checkpoint,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        seed=seed,
        device=device,
    )
    return run_quantization(
        test.model, test.batches, test.classes, read_super_weights(super_weights), settings
    )
