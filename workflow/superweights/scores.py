"""Per-cell scores of an scGPT model on fixed batches, for `confirm_super_weights`.

`CellTypeScore`: log p(true cell type) of each cell (the fine-tuned classifier's
objective). `MaskedExpressionScore`: the Gaussian log-likelihood of each cell's masked
expression values (the pretraining objective; works without a classifier head). Both can
reuse the hidden states entering a layer (`from_layer`), so that pruning a weight of layer
l reruns only layers l.. and the head.

`zeroed_scores` (the confirmation's null draws, stacked) can run the stacked layers in reduced
precision (`PRECISIONS`); each stack then also scores an unedited copy of the cells, and a
draw's score is the fp32 reference plus its difference from that copy, so that the rounding
common to every copy cancels.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .errors import UserError
from .model.scgpt import Packing, ScGPTModel, packing_pays
from .model.tokens import mask_values

DOWN_PROJECTION = re.compile(r"^transformer_encoder\.layers\.(\d+)\.linear2$")
"""Names of scGPT's MLP down-projections; group 1 is the layer."""

TOKENS_PER_FORWARD = {"cuda": 2**19}
"""How many tokens `zeroed_scores` stacks into one forward pass (conditions x cells), per
device type; `DEFAULT_TOKENS_PER_FORWARD` elsewhere."""
DEFAULT_TOKENS_PER_FORWARD = 2**15

PRECISIONS = ("fp32", "tf32x3", "tf32", "bf16")
"""How `zeroed_scores` runs the layers after the pruned one, for an fp32 model:

- "fp32": plain fp32, as every other score call (the reference);
- "tf32x3": each linear layer as three TensorFloat-32 products of operands split into a
  high and a low part (``x W = xh Wh + xl Wh + xh Wl``), which keeps fp32's accuracy on
  the GPU's tensor cores; attention over a padding mask runs on the real tokens only
  (memory-efficient kernel, `cu_seqlens`; its fp32 products are split alike);
- "tf32": TensorFloat-32 matrix products (10-bit mantissas), attention as "tf32x3";
- "bf16": autocast, bf16 matrix products and attention (FlashAttention on packed cells
  where the GPU has it), the residual stream, LayerNorms and the heads in fp32.

On a CPU TensorFloat-32 does not exist and attention stays padded; "tf32x3" still splits
its products (the same arithmetic, for tests). The reduced ones score an unedited copy of
the cells in each stack and return the fp32 reference score plus each draw's difference
from that copy."""


class _CellScore(ABC):
    """Runs the model over fixed batches, from layer 0 or from cached hidden states.

    With `packed` (default: when it pays, see `packing_pays`), only the real tokens of the
    cells are computed (`Packing`); the scores equal the padded ones within rounding.
    `precision` (one of `PRECISIONS`) is how `zeroed_scores` runs its stacked layers; every
    other call runs in the model's own dtype.
    """

    values_key = "values"

    def __init__(
        self,
        model: ScGPTModel,
        batches: list[dict[str, Tensor]],
        packed: bool | None = None,
        precision: str = "fp32",
    ):
        if not batches:
            raise UserError("no cells to score; the chosen split is empty")
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.model, self.batches = model, batches
        self.padding_masks = [b["padding_mask"] for b in batches]
        self.packed = packing_pays(model) if packed is None else packed
        self.packings = [
            Packing.from_padding(b["padding_mask"]) if self.packed else None for b in batches
        ]
        self._prefix: tuple[int, list[Tensor]] | None = None

    @contextmanager
    def from_layer(self, layer: int) -> Iterator[None]:
        """Inside the block, calls start from the hidden states entering `layer` as they are
        now: only weights of `layer` and later layers may change meanwhile."""
        with torch.no_grad():
            states = [self._encode(self.model, i, self._embedded(self.model, i), 0, layer)
                      for i in range(len(self.batches))]  # fmt: skip
        self._prefix = (layer, states)
        try:
            yield
        finally:
            self._prefix = None

    @torch.no_grad()
    def __call__(self, model: ScGPTModel) -> Tensor:
        out = []
        for i, b in enumerate(self.batches):
            if self._prefix is not None:
                start, hidden = self._prefix[0], self._prefix[1][i]
            else:
                start, hidden = 0, self._embedded(model, i)
            out.append(self.per_cell(model, hidden, start, b, self.packings[i]).double())
        return torch.cat(out).cpu()

    def batches_conditions(self, module: str) -> bool:
        """Whether `zeroed_scores` can prune weights of `module` (a down-projection)."""
        return DOWN_PROJECTION.match(module) is not None

    @torch.no_grad()
    def zeroed_scores(
        self, model: ScGPTModel, module: str, positions: Sequence[tuple[int, int]]
    ) -> Tensor:
        """Scores [conditions, cells] with each weight (row, col) of the down-projection
        `module` zeroed alone, equal within rounding to pruning it and calling the score.

        Pruning ``W[j, k]`` of layer l's linear2 only subtracts ``u[t, k] * W[j, k]`` from
        unit j of that layer's residual stream (u: linear2's input), so layer l runs once,
        and from there the conditions run stacked in the batch dimension, each its own copy
        of the cells with its own term subtracted (up to `TOKENS_PER_FORWARD` tokens per
        pass). Uses the `from_layer` cache when it holds layer l.
        """
        layer = int(DOWN_PROJECTION.match(module)[1])
        block = model.transformer_encoder.layers[layer]
        weight = block.linear2.weight
        rows = torch.tensor([int(r) for r, _ in positions], device=weight.device)
        cols = torch.tensor([int(c) for _, c in positions], device=weight.device)
        budget = TOKENS_PER_FORWARD.get(weight.device.type, DEFAULT_TOKENS_PER_FORWARD)
        reduced = self.precision != "fp32" and weight.dtype == torch.float32
        out = []
        for i in range(len(self.batches)):
            residual, u = self._layer_residual(model, i, layer)
            packing = self.packings[i]
            if not reduced:
                chunk = max(1, budget // residual.shape[:-1].numel())
                parts = [
                    self._stacked(model, i, layer, residual, u, rows[s : s + chunk],
                                  cols[s : s + chunk], weight[rows, cols][s : s + chunk], packing)
                    for s in range(0, len(rows), chunk)
                ]  # fmt: skip
                out.append(torch.cat(parts))
                continue
            zero = weight.new_zeros(1)
            reference = self._stacked(model, i, layer, residual, u, rows[:1], cols[:1], zero,
                                      packing)  # fmt: skip
            stack = self._stack_packing(i)
            if stack is not None and packing is None:
                residual, u = stack.pack(residual), stack.pack(u)
            chunk = max(2, budget // residual.shape[:-1].numel())
            parts = []
            for s in range(0, len(rows), chunk - 1):  # each stack: the unedited copy first
                j = torch.cat([rows[:1], rows[s : s + chunk - 1]])
                k = torch.cat([cols[:1], cols[s : s + chunk - 1]])
                w = torch.cat([zero, weight[j[1:], k[1:]]])
                with reduced_precision(self.precision, weight.device):
                    scores = self._stacked(model, i, layer, residual, u, j, k, w, stack)
                parts.append(reference + (scores[1:].double() - scores[:1].double()))
            out.append(torch.cat(parts))
        return torch.cat(out, dim=1).double().cpu()

    @torch.no_grad()
    def path_effects(
        self, model: ScGPTModel, module: str, positions: Sequence[tuple[int, int]], tokens: Tensor
    ) -> Tensor:
        """Each weight's effect through one token: [len(positions), cells, S], for weight
        (row, col) of the down-projection `module` and slot s of cell c, the score with the
        weight kept at token ``tokens[c, s]`` only (pruned at every other token of the cell)
        minus the score with it pruned everywhere (`zeroed_scores`). `tokens`: [cells, S]
        positions, -1 where a cell has no slot s (effect 0).

        The weight adds ``u[t, col] * W[row, col]`` to unit row of token t, so each condition
        is one copy of one cell from layer l + 1 on; where that term is 0 at the kept token
        (linear2's input passed through a ReLU: the unit is off there) the two runs are the
        same and the effect is exactly 0, so only tokens where the unit fires are run.
        Padded batches only (the score made with ``packed=False``)."""
        if any(p is not None for p in self.packings):
            raise ValueError("path_effects needs padded batches: make the score with packed=False")
        layer = int(DOWN_PROJECTION.match(module)[1])
        block = model.transformer_encoder.layers[layer]
        weight = block.linear2.weight
        rows = torch.tensor([int(r) for r, _ in positions], device=weight.device)
        cols = torch.tensor([int(c) for _, c in positions], device=weight.device)
        pruned = self.zeroed_scores(model, module, positions)
        budget = TOKENS_PER_FORWARD.get(weight.device.type, DEFAULT_TOKENS_PER_FORWARD)
        effects = torch.zeros((len(positions), *tokens.shape), dtype=torch.float64)
        start = 0
        for i, batch in enumerate(self.batches):
            residual, u = self._layer_residual(model, i, layer)
            n_cells, width = residual.shape[:2]
            slots = tokens[start : start + n_cells].to(weight.device)
            terms = u[:, :, cols] * weight[rows, cols]  # [B, L, weights]
            kept = terms.gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, len(rows)))
            runs = ((kept != 0) & (slots >= 0)[..., None]).nonzero()  # (cell, slot, weight)
            chunk, every_token = max(1, budget // width), torch.arange(width, device=weight.device)
            for s in range(0, len(runs), chunk):
                cell, slot, j = runs[s : s + chunk].unbind(1)
                n = torch.arange(len(cell), device=weight.device)
                delta = terms[cell, :, j]  # [n, L]: the weight's term at every token
                delta[n, slots[cell, slot]] = 0.0  # but the kept one
                copies = residual[cell]
                copies[n[:, None], every_token, rows[j][:, None]] -= delta
                hidden = block.finish(copies)
                sub = {key: value[cell] for key, value in batch.items()}
                scores = self.per_cell(model, hidden, layer + 1, sub, None).double().cpu()
                cell, slot, j = cell.cpu(), slot.cpu(), j.cpu()
                effects[j, start + cell, slot] = scores - pruned[j, start + cell]
            start += n_cells
        return effects

    def _stack_packing(self, i: int) -> Packing | None:
        """The packing of batch i's stacked copies in reduced precision: the score's own, or
        packed on a CUDA GPU (bf16: FlashAttention; tf32, tf32x3: see `_Fp32Kernels`)."""
        if self.packings[i] is not None or not self.padding_masks[i].is_cuda:
            return self.packings[i]
        return Packing.from_padding(self.padding_masks[i])

    def _embedded(self, model: ScGPTModel, i: int) -> Tensor:
        """Hidden states of batch i entering layer 0 (packed when the score packs)."""
        b, packing = self.batches[i], self.packings[i]
        gene_ids, values = b["gene_ids"], b[self.values_key]
        if packing is not None:
            gene_ids, values = packing.pack(gene_ids), packing.pack(values)
        return model.embed(gene_ids, values)[0]

    def _encode(self, model, i: int, hidden, start: int, stop: int | None = None) -> Tensor:
        padding = self.batches[i]["padding_mask"]
        return model.encode(hidden, padding, start, stop, packing=self.packings[i])

    def _layer_residual(self, model: ScGPTModel, i: int, layer: int) -> tuple[Tensor, Tensor]:
        """`EncoderLayer.residual` of `layer` on batch i, from the cache when it holds it."""
        if self._prefix is not None and self._prefix[0] == layer:
            hidden = self._prefix[1][i]
        else:
            hidden = self._encode(model, i, self._embedded(model, i), 0, layer)
        packing = self.packings[i]
        keep = None if packing is not None else ~self.padding_masks[i].bool()[:, None, None, :]
        return model.transformer_encoder.layers[layer].residual(hidden, keep, packing)

    def _stacked(self, model, i, layer, residual, u, rows, cols, weights, packing) -> Tensor:
        """Scores [C, B] of batch i for C conditions: condition c subtracts
        ``u[..., cols[c]] * weights[c]`` from ``residual[..., rows[c]]`` (both [B, L, D], or
        [T, D] packed as `packing` says)."""
        n = len(rows)
        flat, inputs = residual.flatten(0, -2), u.flatten(0, -2)
        stacked = flat.repeat(n, 1, 1)
        stacked[torch.arange(n, device=flat.device), :, rows] -= (inputs[:, cols] * weights).T
        hidden = model.transformer_encoder.layers[layer].finish(stacked)
        hidden = hidden.view(n * residual.shape[0], *residual.shape[1:])
        b = self.batches[i]
        copies = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in b.items()}
        packing = packing.repeat(n) if packing is not None else None
        return self.per_cell(model, hidden, layer + 1, copies, packing).view(n, -1)

    @abstractmethod
    def per_cell(
        self, model: ScGPTModel, hidden: Tensor, start: int, batch: dict, packing: Packing | None
    ) -> Tensor:
        """Each cell's score [B] from `hidden`, the hidden states entering layer `start`:
        [B, L, D], or [T, D] packed as `packing` says."""


class CellTypeScore(_CellScore):
    """log p(true cell type) per cell, from the classifier head; the last layer runs for the
    `<cls>` tokens alone (`TransformerEncoder.cell_states`), unless hooks watch it."""

    def __init__(
        self,
        model: ScGPTModel,
        batches: list[dict[str, Tensor]],
        packed: bool | None = None,
        precision: str = "fp32",
    ):
        if model.config.n_cls == 0:
            raise UserError("the model has no classifier head; use the masked-expression score")
        super().__init__(model, batches, packed, precision)

    def per_cell(self, model, hidden, start, batch, packing):
        padding = batch["padding_mask"].bool()
        cell_emb = model.transformer_encoder.cell_states(hidden, padding, packing, start)
        with full_precision(cell_emb.device):
            logits = model.cls_decoder(cell_emb.to(model.cls_decoder.out_layer.weight.dtype))
        logp = torch.log_softmax(logits.double(), dim=1)
        return logp.gather(1, batch["labels"][:, None]).squeeze(1)

    @torch.no_grad()
    def log_probs(self, model: ScGPTModel) -> np.ndarray:
        """log p(class) [cells, classes] of the full forward pass."""
        out = []
        for b, packing in zip(self.batches, self.packings, strict=True):
            logits = model(
                b["gene_ids"], b["values"], b["padding_mask"], packing, ["cls_logits"], True
            )
            out.append(torch.log_softmax(logits["cls_logits"].double(), dim=1))
        return torch.cat(out).cpu().numpy()


class MaskedExpressionScore(_CellScore):
    """Mean Gaussian log-likelihood of each cell's masked values under the expression head.

    A fixed share `mask_ratio` of each cell's genes (seeded per batch) is hidden (value -1)
    and predicted; the variance is that of the unedited model's residuals, fixed at
    construction, so that scores of edited models are comparable.
    """

    values_key = "masked_values"

    def __init__(
        self,
        model,
        batches,
        mask_ratio: float = 0.15,
        seed: int = 0,
        packed: bool | None = None,
        precision: str = "fp32",
    ):
        masked = []
        for i, b in enumerate(batches):
            mask_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            hidden, mask = mask_values(b["values"], b["padding_mask"], mask_ratio, mask_seed)
            masked.append(b | {"masked_values": hidden, "mask": mask})
        super().__init__(model, masked, packed, precision)
        with torch.no_grad():
            residuals = [
                self._residual(model, self._encode(model, i, self._embedded(model, i), 0), b,
                               self.packings[i])
                for i, b in enumerate(self.batches)
            ]  # fmt: skip
        total = sum(float(r.sum()) for r, _ in residuals)
        count = sum(float(n.sum()) for _, n in residuals)
        self.variance = max(total / max(count, 1.0), 1e-12)

    def _residual(self, model, hidden, batch, packing) -> tuple[Tensor, Tensor]:
        """Per cell: sum of squared errors at masked genes, and how many there are."""
        with full_precision(hidden.device):
            expr = model.decoder(hidden.to(model.decoder.fc[0].weight.dtype))
        if packing is not None:
            expr = packing.unpack(expr)
        mask = batch["mask"].double()
        squared = (expr.double() - batch["values"].double()) ** 2 * mask
        return squared.sum(1), mask.sum(1)

    def per_cell(self, model, hidden, start, batch, packing):
        hidden = model.encode(hidden, batch["padding_mask"], start, packing=packing)
        squared, count = self._residual(model, hidden, batch, packing)
        mean = squared / count.clamp(min=1)
        return -0.5 * (math.log(2 * math.pi * self.variance) + mean / self.variance)


@contextmanager
def reduced_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run fp32 work inside the block in `precision` (see `PRECISIONS`)."""
    with ExitStack() as stack:
        if precision == "bf16":
            stack.enter_context(torch.autocast(device.type, torch.bfloat16, cache_enabled=False))
        if precision in ("tf32", "tf32x3"):
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            stack.callback(torch.set_float32_matmul_precision, before)
            stack.enter_context(_Fp32Kernels(split=precision == "tf32x3"))
        yield


def _tf32_high(x: Tensor) -> Tensor:
    """x rounded to TensorFloat-32 (10-bit mantissa), so that x - result is exact in fp32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


class _Fp32Kernels(TorchFunctionMode):
    """fp32 linear layers as split TensorFloat-32 products (with `split`), and attention over
    a key-padding mask on the real tokens only (CUDA: memory-efficient kernel, cu_seqlens)."""

    def __init__(self, split: bool):
        super().__init__()
        self.split = split

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.split and args[0].dtype == torch.float32:
            return split_linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention and args[0].is_cuda:
            mask = kwargs.get("attn_mask")
            if args[0].dtype == torch.float32 and _key_padding(mask, args[1]):
                return varlen_attention(*args[:3], mask)
        return func(*args, **kwargs)


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` as ``xh Wh + xl Wh + xh Wl`` (h: rounded to TensorFloat-32, l: the rest):
    fp32's accuracy from TF32 products (the dropped ``xl Wl`` is 2^-22 of ``x W``)."""
    xh, wh = _tf32_high(x), _tf32_high(weight)
    y = F.linear(xh, wh, bias)
    y += F.linear(x - xh, wh)
    y += F.linear(xh, weight - wh)
    return y


def _key_padding(mask, key: Tensor) -> bool:
    """Whether `mask` is a [B, 1, 1, L] bool mask of keys (True = real) for `key` [B, H, L, E]."""
    return (
        isinstance(mask, Tensor)
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1:3] == (1, 1)
        and mask.shape[0] == key.shape[0]
        and mask.shape[3] == key.shape[2]
    )


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """`scaled_dot_product_attention(q, k, v, attn_mask=keep)` for a key-padding mask whose
    real keys come first in each row, computed on the real tokens only: queries at padded
    positions (when q is as long as k) come back as 0. q [B, H, Lq, E], k and v [B, H, L, E]."""
    B, H, Lq, E = q.shape
    keys = keep.reshape(B, -1)
    lengths = keys.sum(1)
    cu_k = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    k_index = keys.flatten().nonzero().squeeze(1)
    k, v = (t.transpose(1, 2).flatten(0, 1)[k_index][None] for t in (k, v))
    if Lq == keys.shape[1]:
        q_index, cu_q, max_q = k_index, cu_k, int(lengths.max())
    else:
        q_index = None
        cu_q = Lq * torch.arange(B + 1, device=q.device, dtype=torch.int32)
        max_q = Lq
    flat_q = q.transpose(1, 2).flatten(0, 1)
    flat_q = (flat_q[q_index] if q_index is not None else flat_q)[None]
    out = torch.ops.aten._efficient_attention_forward(
        flat_q, k, v, None, cu_q, cu_k, max_q, int(lengths.max()), 0.0, 0
    )[0][0]
    if q_index is None:
        return out.view(B, Lq, H, E).transpose(1, 2)
    full = out.new_zeros(B * Lq, H, E).index_copy_(0, q_index, out)
    return full.view(B, Lq, H, E).transpose(1, 2)


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Plain fp32 inside the block, also within `reduced_precision` (for the heads)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    off = device.type in ("cuda", "cpu")
    try:
        with torch.autocast(device.type, enabled=False) if off else nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(before)
