"""Training steps replayed from CUDA graphs.

A training step (forward, backward, gradient clipping, optimiser step) launches hundreds of
small kernels, and at the batch sizes that fit a GPU the host takes longer to launch them
than the GPU to run them. `GraphedSteps` records the whole step once per batch shape as a
CUDA graph and then replays it with one launch per step. Batches must come in few shapes:
packed with `Collate(bucket=...)`, the shape only changes with the number of cells and the
real-token count rounded up to the bucket. All graphs share one memory pool and one set
of gradient tensors (accumulated into, after zeroing, inside each graph).

Requirements (`train.graph_bucket` checks them): a CUDA device, one process, and a loss that
depends on the batch tensors alone (the classifier loss; masked-value objectives draw
their masks on the host). The optimiser's state must exist before the first capture (the
first step runs eagerly, or the state comes from a resumed run); each capture makes the
optimiser capturable first (`make_capturable`: a resumed state brings its learning rate
back as a CPU number).
"""

import torch
from torch import Tensor, nn

from .scgpt import Packing

WARMUP_STEPS = 2
"""Forward and backward passes on a side stream before a shape's capture (no update)."""


def capturable_adamw(params, lr: float, device: torch.device, **options) -> torch.optim.AdamW:
    """Fused AdamW whose learning rate is a device tensor, so that a replayed step reads the
    scheduler's current value; `options` go to AdamW."""
    lr = torch.tensor(lr, device=device)
    return torch.optim.AdamW(params, lr=lr, fused=True, capturable=True, **options)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every parameter group capturable, its learning rate a tensor on `device` (with the
    value it has): `load_state_dict` brings back whatever the saved state held."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), device=device)
        group["capturable"] = True


class GraphedSteps:
    """Optimiser steps of `loss_fn(model, batch)` on packed batches, one CUDA graph per
    batch shape (captured on first sight, after `WARMUP_STEPS` passes)."""

    def __init__(self, model: nn.Module, loss_fn, optimizer, grad_clip: float, autocast):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.grad_clip, self.autocast = grad_clip, autocast
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, Tensor]] = {}

    def __call__(self, batch: dict) -> Tensor:
        """One step on `batch` (host tensors, pinned for speed); returns its loss (a 0-d
        device tensor)."""
        key = tuple(batch["gene_ids"].shape) + (len(batch["packing"].index),)
        self.model.train()  # a capture records the modules' current mode
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        graph, static, loss = self.graphs[key]
        for name, value in batch.items():
            if isinstance(value, Packing):
                static[name].index.copy_(value.index, non_blocking=True)
                static[name].cu_seqlens.copy_(value.cu_seqlens, non_blocking=True)
            else:
                static[name].copy_(value, non_blocking=True)
        graph.replay()
        return loss.detach().clone()

    def _loss(self, batch: dict) -> Tensor:
        with self.autocast():
            return self.loss_fn(self.model, batch)

    def _capture(self, batch: dict):
        device = next(self.model.parameters()).device
        make_capturable(self.optimizer, device)
        static = {name: value.to(device) for name, value in batch.items()}
        for param in self.model.parameters():  # one set of gradients for all graphs
            if param.grad is None and param in self.optimizer.state:  # not the unused ones
                param.grad = torch.zeros_like(param)
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.model.zero_grad(set_to_none=False)
                self._loss(static).backward()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader thread pinning memory meanwhile does not break it
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.optimizer.zero_grad(set_to_none=False)
            loss = self._loss(static)
            loss.backward()
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        return graph, static, loss
