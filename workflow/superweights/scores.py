"""Per-cell scores of an scGPT model on fixed batches, for `confirm_super_weights`.

`CellTypeScore`: log p(true cell type) of each cell (the fine-tuned classifier's
objective). `MaskedExpressionScore`: the Gaussian log-likelihood of each cell's masked
expression values (the pretraining objective; works without a classifier head). Both can
reuse the hidden states entering a layer (`from_layer`), so that pruning a weight of layer
l reruns only layers l.. and the head.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .model.scgpt import ScGPTModel
from .model.tokens import mask_values


class _CellScore(ABC):
    """Runs the model over fixed batches, from layer 0 or from cached hidden states."""

    values_key = "values"

    def __init__(self, model: ScGPTModel, batches: list[dict[str, Tensor]]):
        if not batches:
            raise UserError("no cells to score; the chosen split is empty")
        self.model, self.batches = model, batches
        self.padding_masks = [b["padding_mask"] for b in batches]
        self._prefix: tuple[int, list[Tensor]] | None = None

    @contextmanager
    def from_layer(self, layer: int) -> Iterator[None]:
        """Inside the block, calls start from the hidden states entering `layer` as they are
        now: only weights of `layer` and later layers may change meanwhile."""
        with torch.no_grad():
            states = []
            for b in self.batches:
                hidden, _ = self.model.embed(b["gene_ids"], b[self.values_key])
                states.append(self.model.encode(hidden, b["padding_mask"], 0, layer))
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
                start, (hidden, _) = 0, model.embed(b["gene_ids"], b[self.values_key])
            hidden = model.encode(hidden, b["padding_mask"], start)
            out.append(self.per_cell(model, hidden, b).double())
        return torch.cat(out).cpu()

    @abstractmethod
    def per_cell(self, model: ScGPTModel, hidden: Tensor, batch: dict) -> Tensor:
        """Each cell's score [B] from the encoder's output `hidden` [B, L, D]."""


class CellTypeScore(_CellScore):
    """log p(true cell type) per cell, from the classifier head."""

    def __init__(self, model: ScGPTModel, batches: list[dict[str, Tensor]]):
        if model.config.n_cls == 0:
            raise UserError("the model has no classifier head; use the masked-expression score")
        super().__init__(model, batches)

    def per_cell(self, model, hidden, batch):
        logits = model.decode(hidden, None, heads=["cls_logits"])["cls_logits"]
        logp = torch.log_softmax(logits.double(), dim=1)
        return logp.gather(1, batch["labels"][:, None]).squeeze(1)

    @torch.no_grad()
    def log_probs(self, model: ScGPTModel) -> np.ndarray:
        """log p(class) [cells, classes] of the full forward pass."""
        out = []
        for b in self.batches:
            logits = model(b["gene_ids"], b["values"], b["padding_mask"], heads=["cls_logits"])
            out.append(torch.log_softmax(logits["cls_logits"].double(), dim=1))
        return torch.cat(out).cpu().numpy()


class MaskedExpressionScore(_CellScore):
    """Mean Gaussian log-likelihood of each cell's masked values under the expression head.

    A fixed share `mask_ratio` of each cell's genes (seeded per batch) is hidden (value -1)
    and predicted; the variance is that of the unedited model's residuals, fixed at
    construction, so that scores of edited models are comparable.
    """

    values_key = "masked_values"

    def __init__(self, model, batches, mask_ratio: float = 0.15, seed: int = 0):
        masked = []
        for i, b in enumerate(batches):
            mask_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            hidden, mask = mask_values(b["values"], b["padding_mask"], mask_ratio, mask_seed)
            masked.append(b | {"masked_values": hidden, "mask": mask})
        super().__init__(model, masked)
        self.variance = 1.0
        residuals = [self._squared(model, b) for b in self.batches]
        total = sum(float(r.sum()) for r, _ in residuals)
        count = sum(float(n.sum()) for _, n in residuals)
        self.variance = max(total / max(count, 1.0), 1e-12)

    @torch.no_grad()
    def _squared(self, model, batch) -> tuple[Tensor, Tensor]:
        values = batch["masked_values"]
        out = model(batch["gene_ids"], values, batch["padding_mask"], heads=["expr"])
        return self._residual(out["expr"], batch)

    def _residual(self, expr: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
        """Per cell: sum of squared errors at masked genes, and how many there are."""
        mask = batch["mask"].double()
        squared = (expr.double() - batch["values"].double()) ** 2 * mask
        return squared.sum(1), mask.sum(1)

    def per_cell(self, model, hidden, batch):
        expr = model.decode(hidden, None, heads=["expr"])["expr"]
        squared, count = self._residual(expr, batch)
        mean = squared / count.clamp(min=1)
        return -0.5 * (math.log(2 * math.pi * self.variance) + mean / self.variance)
