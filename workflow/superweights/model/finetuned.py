"""A fine-tuned checkpoint with its dataset's held-out test cells, as later stages use them."""

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import pandas as pd
import torch
from torch import Tensor

from ..data.preprocess import class_names, read_tokenised
from .args import CellCut, cell_cut
from .cells import cell_batches, sample_rows
from .checkpoint import check_classes, load_checkpoint, pick_device
from .scgpt import ScGPTConfig, ScGPTModel


@dataclass
class TestCells:
    """The model, its vocabulary and class order, fixed batches of cells, their obs, and the
    cut of its training that they were cut with."""

    model: ScGPTModel
    config: ScGPTConfig
    vocab: dict[str, int]
    classes: list[str]
    batches: list[dict[str, Tensor]]
    obs: pd.DataFrame
    device: torch.device
    cut: CellCut


def load_test_cells(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    *,
    batch_size: int,
    seed: int,
    max_cells: int | None = None,
    device: str | torch.device | None = None,
    split: str = "test",
    labelled: bool = True,
) -> TestCells:
    """Load a checkpoint and (up to `max_cells`, sampled with `seed`) cells of `split` (the
    held-out test donors by default) as batches on the model's device, cut as the
    checkpoint's training cut them (`args.cell_cut`); with `labelled`, batches carry the cell
    types and the checkpoint must classify this dataset's types."""
    adata = read_tokenised(tokenised)
    classes = class_names(adata)
    device = torch.device(device) if device else pick_device()
    model, config, vocab = load_checkpoint(checkpoint, device=device)
    if labelled:
        check_classes(checkpoint, config.n_cls, classes)
    cut = cell_cut(checkpoint)
    rows = sample_rows(adata.obs["split"].astype(str).to_numpy(), [split], max_cells, seed)
    batches = cell_batches(
        adata, vocab, rows, pad_token_id=config.pad_token_id, batch_size=batch_size,
        max_seq_len=cut.max_seq_len, seed=cut.seed, labelled=labelled, device=device,
    )  # fmt: skip
    return TestCells(model, config, vocab, classes, batches, adata.obs.iloc[rows], device, cut)
