"""A fine-tuned checkpoint with its dataset's held-out test cells, as later stages use them."""

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from .checkpoint import load_checkpoint
from .scgpt import ScGPTConfig, ScGPTModel
from .train import (
    TrainSettings,
    class_names,
    make_loader,
    pick_device,
    read_tokenised,
    split_datasets,
)


@dataclass
class TestCells:
    """The model, its vocabulary and class order, and a fixed loader over test cells."""

    model: ScGPTModel
    config: ScGPTConfig
    vocab: dict[str, int]
    classes: list[str]
    loader: DataLoader
    obs: pd.DataFrame
    device: torch.device


def load_test_cells(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    *,
    batch_size: int,
    max_seq_len: int,
    seed: int,
    max_cells: int | None = None,
    device: str | torch.device | None = None,
    split: str = "test",
    labelled: bool = True,
) -> TestCells:
    """Load a checkpoint and (up to `max_cells`, seeded) cells of `split` (the held-out test
    donors by default) in fixed order; with `labelled`, batches carry the cell types and the
    checkpoint must classify this dataset's types."""
    adata = read_tokenised(tokenised)
    classes = class_names(adata)
    device = torch.device(device) if device else pick_device()
    model, config, vocab = load_checkpoint(checkpoint, device=device)
    if labelled and config.n_cls != len(classes):
        raise UserError(
            f"the checkpoint classifies {config.n_cls} classes but the data has {len(classes)}; "
            "use the fine-tuned checkpoint of this dataset"
        )
    settings = TrainSettings(batch_size=batch_size, max_seq_len=max_seq_len, seed=seed)
    test = split_datasets(adata, vocab, settings, labelled=labelled)[split]
    n = len(test)
    if n == 0:
        raise UserError(f"no cells in split '{split}'; preprocess needs more donors")
    cells = np.arange(n)
    if max_cells is not None and n > max_cells:
        cells = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    loader = make_loader(test, settings, config.pad_token_id, shuffle=False, sampler=cells.tolist())
    obs = adata.obs.loc[(adata.obs["split"].astype(str) == split).to_numpy()].iloc[cells]
    return TestCells(model, config, vocab, classes, loader, obs, device)
