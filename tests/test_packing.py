"""Packed batches (only real tokens, attention per cell) give the padded batch's results."""

import pytest
import torch

from superweights.model.scgpt import (
    Packing,
    ScGPTConfig,
    ScGPTModel,
    flash_attention_available,
)
from superweights.model.tokens import Collate

PAD_ID = 47
LENGTHS = (9, 5, 2, 7)


def padded_batch(lengths=LENGTHS, width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(lengths), width)
    gene_ids = torch.randint(0, PAD_ID, shape, generator=g)
    values = torch.randint(0, 51, shape, generator=g).float()
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    gene_ids[padding], values[padding] = PAD_ID, -2.0
    return gene_ids, values, padding


def model(pre_norm=False, dropout=0.0):
    torch.manual_seed(0)
    config = ScGPTConfig(
        ntoken=50, d_model=32, nhead=4, d_hid=24, nlayers=3, n_cls=5, pad_token_id=PAD_ID,
        do_mvc=True, pre_norm=pre_norm, dropout=dropout,
    )  # fmt: skip
    return ScGPTModel(config)


def test_packing_lays_real_tokens_end_to_end():
    gene_ids, _, padding = padded_batch()
    packing = Packing.from_padding(padding)
    assert packing.cu_seqlens.tolist() == [0, 9, 14, 16, 23]
    assert packing.cu_seqlens.dtype == torch.int32 and packing.max_len == 9
    packed = packing.pack(gene_ids)
    assert packed.tolist() == sum((gene_ids[i, :n].tolist() for i, n in enumerate(LENGTHS)), [])
    assert packing.cell_of_token().tolist() == sum(([i] * n for i, n in enumerate(LENGTHS)), [])
    assert torch.equal(packing.unpack(packed, fill=PAD_ID), gene_ids)
    assert torch.equal(packing.padding_mask(), padding)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_packed_forward_and_gradients_equal_padded(pre_norm):
    gene_ids, values, padding = padded_batch()
    packing = Packing.from_padding(padding)
    net = model(pre_norm).train()  # train-mode maths, dropout 0
    padded = net(gene_ids, values, padding)
    packed = net(gene_ids, values, padding, packing=packing)
    real = ~padding
    for key in ("hidden", "expr", "mvc"):
        torch.testing.assert_close(packed[key][real], padded[key][real], rtol=1e-5, atol=1e-5)
        assert not packed[key][padding].any(), key  # nothing computed at padding
    for key in ("cell_emb", "cls_logits"):
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-5)
    grads = []
    for out in (padded, packed):
        net.zero_grad()
        (out["cls_logits"].logsumexp(1).sum() + out["expr"][real].square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_heads_limit_what_is_computed():
    gene_ids, values, padding = padded_batch()
    out = model()(gene_ids, values, padding, heads=("cls_logits",))
    assert set(out) == {"hidden", "cell_emb", "cls_logits"}


def test_collate_packs_on_request():
    items = [
        {"gene_ids": torch.tensor([48, 1, 2]), "values": torch.tensor([0.0, 3.0, 4.0])},
        {"gene_ids": torch.tensor([48, 5]), "values": torch.tensor([0.0, 1.0])},
    ]
    assert "packing" not in Collate(PAD_ID)(items)
    batch = Collate(PAD_ID, pack=True)(items)
    assert batch["packing"].cu_seqlens.tolist() == [0, 3, 5]
    assert torch.equal(batch["packing"].padding_mask(), batch["padding_mask"])


@pytest.mark.skipif(
    not (torch.cuda.is_available() and flash_attention_available(torch.device("cuda"))),
    reason="FlashAttention needs a CUDA GPU of compute capability 8.0 or newer",
)
def test_flash_attention_path_matches_padded_on_gpu():
    """bf16 FlashAttention varlen kernel vs padded SDPA, same weights (run on the GPU tool)."""
    gene_ids, values, padding = (t.cuda() for t in padded_batch(width=64, lengths=(64, 30, 3, 50)))
    packing = Packing.from_padding(padding)
    net = model().cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = net(gene_ids, values, padding)
        packed = net(gene_ids, values, padding, packing=packing)
    real = ~padding
    torch.testing.assert_close(
        packed["hidden"][real].float(), padded["hidden"][real].float(), rtol=0.05, atol=0.05
    )
    torch.testing.assert_close(
        packed["cls_logits"].float(), padded["cls_logits"].float(), rtol=0.05, atol=0.05
    )
    packed["cls_logits"].float().sum().backward()
    assert all(p.grad is not None for p in net.transformer_encoder.parameters())
