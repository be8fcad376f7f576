"""Per-cell scores of an scGPT model on fixed batches, for `confirm_super_weights`.

`CellTypeScore`: log p(true cell type) of each cell (the fine-tuned classifier's
objective). `MaskedExpressionScore`: the Gaussian log-likelihood of each cell's masked
expression values (the pretraining objective; works without a classifier head). Both can
reuse the hidden states entering a layer (`from_layer`), so that pruning a weight of layer
l reruns only layers l.. and the head.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .model.scgpt import Packing, ScGPTModel, packing_pays
from .model.tokens import mask_values

DOWN_PROJECTION = re.compile(r"^transformer_encoder\.layers\.(\d+)\.linear2$")
"""Names of scGPT's MLP down-projections; group 1 is the layer."""

TOKENS_PER_FORWARD = {"cuda": 2**19}
"""How many tokens `zeroed_scores` stacks into one forward pass (conditions x cells), per
device type; `DEFAULT_TOKENS_PER_FORWARD` elsewhere."""
DEFAULT_TOKENS_PER_FORWARD = 2**15


class _CellScore(ABC):
    """Runs the model over fixed batches, from layer 0 or from cached hidden states.

    With `packed` (default: when it pays, see `packing_pays`), only the real tokens of the
    cells are computed (`Packing`); the scores equal the padded ones within rounding.
    """

    values_key = "values"

    def __init__(
        self, model: ScGPTModel, batches: list[dict[str, Tensor]], packed: bool | None = None
    ):
        if not batches:
            raise UserError("no cells to score; the chosen split is empty")
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
        out = []
        for i in range(len(self.batches)):
            residual, u = self._layer_residual(model, i, layer)
            chunk = max(1, budget // residual.shape[:-1].numel())
            parts = []
            for s in range(0, len(rows), chunk):
                j, k = rows[s : s + chunk], cols[s : s + chunk]
                parts.append(self._stacked(model, i, layer, residual, u, j, k, weight[j, k]))
            out.append(torch.cat(parts))
        return torch.cat(out, dim=1).double().cpu()

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

    def _stacked(self, model, i, layer, residual, u, rows, cols, weights) -> Tensor:
        """Scores [C, B] of batch i for C conditions: condition c subtracts
        ``u[..., cols[c]] * weights[c]`` from ``residual[..., rows[c]]``."""
        n = len(rows)
        flat, inputs = residual.flatten(0, -2), u.flatten(0, -2)
        stacked = flat.repeat(n, 1, 1)
        stacked[torch.arange(n, device=flat.device), :, rows] -= (inputs[:, cols] * weights).T
        hidden = model.transformer_encoder.layers[layer].finish(stacked)
        hidden = hidden.view(n * residual.shape[0], *residual.shape[1:])
        b, packing = self.batches[i], self.packings[i]
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
        self, model: ScGPTModel, batches: list[dict[str, Tensor]], packed: bool | None = None
    ):
        if model.config.n_cls == 0:
            raise UserError("the model has no classifier head; use the masked-expression score")
        super().__init__(model, batches, packed)

    def per_cell(self, model, hidden, start, batch, packing):
        padding = batch["padding_mask"].bool()
        cell_emb = model.transformer_encoder.cell_states(hidden, padding, packing, start)
        logp = torch.log_softmax(model.cls_decoder(cell_emb).double(), dim=1)
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
        self, model, batches, mask_ratio: float = 0.15, seed: int = 0, packed: bool | None = None
    ):
        masked = []
        for i, b in enumerate(batches):
            mask_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            hidden, mask = mask_values(b["values"], b["padding_mask"], mask_ratio, mask_seed)
            masked.append(b | {"masked_values": hidden, "mask": mask})
        super().__init__(model, masked, packed)
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
        expr = model.decoder(hidden)
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
