"""Cells of a tokenised AnnData as scGPT input sequences (a dataset per split), the
vocabulary a model pretrained here gets, batching and value masking.

A cell becomes `<cls>` (value 0) followed by its expressed genes (token id, bin value).
A cell with more genes than fit is represented by a random subset of them, drawn again
each epoch and reproducible from (seed, epoch, cell index). Batches are padded with
`<pad>` and the pad value -2; masked expression values become -1.
"""

import logging
from dataclasses import dataclass, replace

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..data.vocab import SPECIAL_TOKENS
from ..errors import UserError
from ..settings import SPLITS
from .scgpt import Packing

log = logging.getLogger(__name__)

CLS_VALUE = 0.0
PAD_VALUE = -2.0
MASK_VALUE = -1.0
IGNORE_LABEL = -100
"""Label of filler rows; `F.cross_entropy` leaves it out by default."""


def gene_token_ids(genes, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the genes found in `vocab` and their token ids; logs how many were dropped."""
    columns = np.array([i for i, g in enumerate(genes) if g in vocab], dtype=np.int64)
    if columns.size == 0:
        raise UserError(
            "none of the data's genes is in the model vocabulary; are the genes symbols, and "
            "does the checkpoint's vocab.json belong to a human scGPT model?"
        )
    dropped = len(genes) - columns.size
    if dropped:
        log.warning("dropped %d of %d genes missing from the model vocabulary", dropped, len(genes))
    ids = np.array([vocab[genes[i]] for i in columns], dtype=np.int64)
    return columns, ids


def data_vocab(genes: list[str], vocab: dict[str, int]) -> dict[str, int]:
    """The genes of `genes` that `vocab` knows, in vocab order, then `<pad>`, `<cls>`, `<eoc>`.

    Ids are renumbered from 0 (special tokens last, as in scGPT's vocabulary), so a model
    pretrained here has an embedding row for every token it can see and no others.
    """
    known = sorted((vocab[g], g) for g in set(genes) if g in vocab)
    if not known:
        gene_token_ids(genes, vocab)  # raises the UserError
    names = [g for _, g in known] + list(SPECIAL_TOKENS)
    return {name: i for i, name in enumerate(names)}


class CellDataset(Dataset):
    """One scGPT sequence per cell of a (cells x genes) bin matrix.

    `token_ids[j]` is the token of column j; `labels` (optional) are integer classes.
    Call `set_epoch` before each epoch so long cells get a fresh gene subset.
    """

    def __init__(
        self,
        bins: sp.spmatrix,
        token_ids: np.ndarray,
        cls_id: int,
        max_seq_len: int,
        labels: np.ndarray | None = None,
        seed: int = 0,
    ):
        if max_seq_len < 2:
            raise UserError(f"max_seq_len must be at least 2 (<cls> + one gene), not {max_seq_len}")
        matrix = sp.csr_matrix(bins)
        matrix.eliminate_zeros()
        self.indptr = matrix.indptr
        self.indices = matrix.indices
        self.values = matrix.data.astype(np.float32)
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        self.cls_id = cls_id
        self.max_seq_len = max_seq_len
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        lo, hi = self.indptr[index], self.indptr[index + 1]
        columns, values = self.indices[lo:hi], self.values[lo:hi]
        room = self.max_seq_len - 1
        if columns.size > room:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            keep = np.sort(rng.choice(columns.size, room, replace=False))
            columns, values = columns[keep], values[keep]
        item = {
            "gene_ids": torch.from_numpy(np.concatenate([[self.cls_id], self.token_ids[columns]])),
            "values": torch.from_numpy(np.concatenate([[CLS_VALUE], values]).astype(np.float32)),
        }
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[index])
        return item


def split_datasets(
    adata: ad.AnnData,
    vocab: dict[str, int],
    *,
    max_seq_len: int,
    seed: int,
    labelled: bool,
    required: tuple[str, ...] = ("train", "val"),
) -> dict[str, CellDataset]:
    """A CellDataset per split (train/val/test) over the genes that `vocab` knows, long cells
    cut to `max_seq_len` tokens with `seed`; the `required` splits must hold cells."""
    columns, token_ids = gene_token_ids(list(map(str, adata.var_names)), vocab)
    bins = (adata.layers["X_binned"] if "X_binned" in adata.layers else adata.X)[:, columns]
    split = adata.obs["split"].astype(str).to_numpy()
    codes = adata.obs["cell_type"].astype("category").cat.codes.to_numpy() if labelled else None
    datasets = {}
    for name in SPLITS:
        rows = np.flatnonzero(split == name)
        datasets[name] = CellDataset(
            bins[rows],
            token_ids,
            cls_id=vocab["<cls>"],
            max_seq_len=max_seq_len,
            labels=None if codes is None else codes[rows],
            seed=seed,
        )
    for name in required:
        if len(datasets[name]) == 0:
            raise UserError(f"no cells in split '{name}'; preprocess needs more donors")
    return datasets


@dataclass
class Collate:
    """Pad a list of cells to the longest one: gene_ids, values, padding_mask (True = pad).

    With `pack`, the batch also holds its `Packing` (for the model's packed forward pass).
    With `bucket` (and `pack`), batches come in few shapes, for CUDA graphs: padded to
    `width` columns, plus one filler row of `<pad>` tokens counted as real (label
    `IGNORE_LABEL`, its own sequence in the packing) of 1 to `bucket` tokens that brings
    the packed token count to a multiple of `bucket` (at most `width`); the packing's
    `max_len` is `width`.
    """

    pad_id: int
    pad_value: float = PAD_VALUE
    pack: bool = False
    bucket: int = 0
    width: int | None = None

    def __post_init__(self):
        if self.bucket and not (self.pack and self.width and 0 < self.bucket <= self.width):
            raise ValueError(f"bucket {self.bucket} needs pack and 0 < bucket <= width")

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        lengths = [len(item["gene_ids"]) for item in items]
        length = self.width if self.bucket else max(lengths)
        rows = len(items) + (1 if self.bucket else 0)
        gene_ids = torch.full((rows, length), self.pad_id, dtype=torch.long)
        values = torch.full((rows, length), self.pad_value, dtype=torch.float32)
        for row, item in enumerate(items):
            gene_ids[row, : lengths[row]] = item["gene_ids"]
            values[row, : lengths[row]] = item["values"]
        padding = gene_ids == self.pad_id
        if self.bucket:
            padding[-1, : self.bucket - sum(lengths) % self.bucket] = False  # the filler
        batch = {"gene_ids": gene_ids, "values": values, "padding_mask": padding}
        if "label" in items[0]:
            labels = [item["label"] for item in items]
            if self.bucket:
                labels.append(torch.tensor(IGNORE_LABEL))
            batch["labels"] = torch.stack(labels)
        if self.pack:
            packing = Packing.from_padding(padding)
            batch["packing"] = replace(packing, max_len=length) if self.bucket else packing
        return batch


def mask_values(
    values: Tensor, padding_mask: Tensor, mask_ratio: float, seed: int, mask_value=MASK_VALUE
) -> tuple[Tensor, Tensor]:
    """Mask floor(mask_ratio x n) of each cell's n gene positions (not `<cls>`, not padding).

    Returns the masked values and the boolean mask; the targets are the original `values`.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise UserError(f"mask_ratio must be in [0, 1), not {mask_ratio}")
    eligible = ~padding_mask.bool()
    eligible[:, 0] = False
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(values.shape, generator=generator).to(values.device)
    scores = scores.masked_fill(~eligible, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    n_mask = (eligible.sum(dim=1) * mask_ratio).floor().long()
    mask = ranks < n_mask[:, None]
    return values.masked_fill(mask, mask_value), mask


class EpochSampler(Sampler[int]):
    """Indices in a seeded order, reshuffled per epoch (`set_epoch`, as DistributedSampler)."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())
