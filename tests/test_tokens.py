"""Cell sequences, padding, subsampling and value masking for scGPT input."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from superweights.errors import UserError
from superweights.model.tokens import (
    CellDataset,
    Collate,
    EpochSampler,
    gene_token_ids,
    mask_values,
)

CLS, PAD = 98, 97
TOKENS = np.arange(10, 30)  # token id of each of the 20 columns


def bins(rows: list[dict[int, float]]) -> sp.csr_matrix:
    """A cells x 20 bin matrix from {column: bin} per cell."""
    dense = np.zeros((len(rows), len(TOKENS)), np.float32)
    for i, row in enumerate(rows):
        for j, value in row.items():
            dense[i, j] = value
    return sp.csr_matrix(dense)


def test_sequence_is_cls_then_expressed_genes():
    data = CellDataset(bins([{2: 5, 7: 1}, {}]), TOKENS, CLS, max_seq_len=8, labels=[1, 0])
    first = data[0]
    assert first["gene_ids"].tolist() == [CLS, 12, 17]
    assert first["values"].tolist() == [0.0, 5.0, 1.0]
    assert first["label"].item() == 1
    empty = data[1]
    assert empty["gene_ids"].tolist() == [CLS] and empty["values"].tolist() == [0.0]
    assert "label" not in CellDataset(bins([{1: 1}]), TOKENS, CLS, max_seq_len=8)[0]


def test_long_cells_are_subsampled_reproducibly_per_epoch():
    row = {j: float(j + 1) for j in range(20)}
    data = CellDataset(bins([row, {0: 3}]), TOKENS, CLS, max_seq_len=6, seed=3)
    a = data[0]
    assert len(a["gene_ids"]) == 6 and a["gene_ids"][0] == CLS
    genes = a["gene_ids"][1:].numpy()
    assert len(set(genes)) == 5 and set(genes) <= set(TOKENS)
    # values stay paired with their genes
    np.testing.assert_array_equal(a["values"][1:].numpy(), genes - 10 + 1)
    assert torch.equal(data[0]["gene_ids"], a["gene_ids"])
    again = CellDataset(bins([row, {0: 3}]), TOKENS, CLS, max_seq_len=6, seed=3)
    assert torch.equal(again[0]["gene_ids"], a["gene_ids"])
    subsets = set()
    for epoch in range(5):
        data.set_epoch(epoch)
        subsets.add(tuple(data[0]["gene_ids"].tolist()))
    assert len(subsets) > 1
    assert data[1]["gene_ids"].tolist() == [CLS, 10]  # short cells are never subsampled


def test_exactly_fitting_cell_is_kept_whole():
    row = {j: 1.0 for j in range(5)}
    data = CellDataset(bins([row]), TOKENS, CLS, max_seq_len=6)
    assert data[0]["gene_ids"].tolist() == [CLS, 10, 11, 12, 13, 14]


def test_collate_pads_to_longest_cell():
    data = CellDataset(bins([{1: 2, 3: 4, 5: 6}, {0: 9}]), TOKENS, CLS, 10, labels=[0, 2])
    batch = Collate(PAD)([data[0], data[1]])
    assert batch["gene_ids"].shape == (2, 4) and batch["gene_ids"].dtype == torch.long
    assert batch["gene_ids"][1].tolist() == [CLS, 10, PAD, PAD]
    assert batch["values"][1].tolist() == [0.0, 9.0, -2.0, -2.0]
    assert batch["padding_mask"].tolist() == [[False] * 4, [False, False, True, True]]
    assert batch["labels"].tolist() == [0, 2]


def test_mask_ratio_spares_cls_and_padding_and_is_seeded():
    lengths = torch.tensor([41, 21, 1])
    padding = torch.arange(41)[None, :] >= lengths[:, None]
    values = torch.arange(3 * 41, dtype=torch.float32).view(3, 41) + 1
    values[padding] = -2
    masked, mask = mask_values(values, padding, 0.25, seed=5)
    assert mask.sum(dim=1).tolist() == [10, 5, 0]  # floor(0.25 x genes), <cls> not counted
    assert not mask[:, 0].any() and not (mask & padding).any()
    assert (masked[mask] == -1).all()
    assert torch.equal(masked[~mask], values[~mask])
    again, same = mask_values(values, padding, 0.25, seed=5)
    assert torch.equal(again, masked) and torch.equal(same, mask)
    _, other = mask_values(values, padding, 0.25, seed=6)
    assert not torch.equal(other, mask)
    assert not mask_values(values, padding, 0.0, seed=5)[1].any()
    with pytest.raises(UserError, match="mask_ratio"):
        mask_values(values, padding, 1.0, seed=5)


def test_epoch_sampler_is_seeded_and_reshuffles():
    sampler = EpochSampler(50, shuffle=True, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(EpochSampler(50, shuffle=True, seed=1)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochSampler(7, shuffle=False)) == list(range(7))


def test_gene_token_ids_drops_unknown_genes():
    columns, ids = gene_token_ids(["A", "X", "B"], {"A": 4, "B": 9})
    assert columns.tolist() == [0, 2] and ids.tolist() == [4, 9]
    with pytest.raises(UserError, match="vocabulary"):
        gene_token_ids(["X", "Y"], {"A": 4})


def test_too_short_max_seq_len_is_a_user_error():
    with pytest.raises(UserError, match="max_seq_len"):
        CellDataset(bins([{1: 1}]), TOKENS, CLS, max_seq_len=1)
