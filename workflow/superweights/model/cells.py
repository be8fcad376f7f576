"""Cells of a tokenised dataset as fixed batches on a device, tokenised as training does.

Every stage after training (probe, confirmation, channel mapping, quantization) reads its
cells through `cell_batches`, so a cell always carries the same genes: the ones its split's
`CellDataset` draws for it (cells with more than `max_seq_len` genes are subsampled with the
training seed, by the cell's index inside its split).
"""

from collections.abc import Sequence

import anndata as ad
import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..settings import SPLITS
from .tokens import Collate, split_datasets


def cell_batches(
    adata: ad.AnnData,
    vocab: dict[str, int],
    positions: Sequence[int],
    *,
    pad_token_id: int,
    batch_size: int,
    max_seq_len: int,
    seed: int,
    labelled: bool,
    device: str | torch.device = "cpu",
) -> list[dict[str, Tensor]]:
    """Batches (gene_ids, values, padding_mask, and labels when `labelled`) of the cells at
    row `positions` of `adata`, in that order."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        raise UserError("no cells to run; the chosen split(s) hold none")
    datasets = split_datasets(
        adata, vocab, max_seq_len=max_seq_len, seed=seed, labelled=labelled, required=()
    )
    split = adata.obs["split"].astype(str).to_numpy()
    within = np.zeros(len(split), dtype=np.int64)  # a cell's index inside its split
    for name in SPLITS:
        rows = split == name
        within[rows] = np.arange(rows.sum())
    items = [datasets[split[p]][int(within[p])] for p in positions]
    collate = Collate(pad_token_id)
    return [
        {k: v.to(device) for k, v in collate(items[i : i + batch_size]).items()}
        for i in range(0, len(items), batch_size)
    ]


def sample_rows(
    split: np.ndarray, splits: Sequence[str], max_cells: int | None, seed: int
) -> np.ndarray:
    """Rows of cells in `splits` (all when empty), at most `max_cells` of them (seeded)."""
    wanted = np.isin(split, list(splits)) if splits else np.ones(len(split), bool)
    rows = np.flatnonzero(wanted)
    if rows.size == 0:
        raise UserError(f"no cells in split(s) {list(splits)}")
    if max_cells is not None and rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    return rows
