"""Data-parallel training over the visible GPUs (or CPU processes) when started by torchrun.

Each global batch of `batch_size` cells is split into contiguous per-rank slices, so the
cells in every optimizer step are exactly those of a single-process run with the same
`batch_size`. Losses are weighted by each rank's share of the global batch, so that DDP's
gradient average equals the single-process gradient of the global batch mean.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    """This process's rank among `size` data-parallel processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes outputs."""
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's GPU (one per process, by local rank), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE = World()


def init_world() -> World:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(world.device())
        dist.init_process_group(backend)
    return world


class RankSlices(Sampler[list[int]]):
    """Batches of one rank: its contiguous slice of each global batch of the base order.

    A final global batch with fewer cells than ranks is dropped, so no rank is ever idle in
    a step (DDP needs every rank in every all-reduce).
    """

    def __init__(self, base: Sampler[int], batch_size: int, world: World):
        self.base, self.batch_size, self.world = base, batch_size, world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _global_batches(self) -> list[list[int]]:
        order = list(self.base)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [b for b in batches if len(b) >= self.world.size]

    def __iter__(self):
        for batch in self._global_batches():
            yield np.array_split(batch, self.world.size)[self.world.rank].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())

    def global_sizes(self) -> list[int]:
        """Cells in each global batch of the current epoch (all ranks together)."""
        return [len(b) for b in self._global_batches()]


def loss_weight(n_local: int, n_global: int, world: World) -> float:
    """world.size × (this rank's cells / global cells): DDP's mean then equals the global mean."""
    return world.size * n_local / n_global


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Each value summed over all ranks (float64); the values themselves in one process."""
    if world.size == 1:
        return [float(v) for v in values]
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()
