"""Packed batches (only real tokens, attention per cell) give the padded batch's results."""

import functools

import pytest
import torch

from superweights.model import scgpt
from superweights.model.scgpt import (
    Packing,
    ScGPTConfig,
    ScGPTModel,
    flash_attention_available,
)
from superweights.model.tokens import Collate

PAD_ID = 47

NEEDS_FLASH = pytest.mark.skipif(
    not (torch.cuda.is_available() and flash_attention_available(torch.device("cuda"))),
    reason="FlashAttention needs a CUDA GPU of compute capability 8.0 or newer",
)
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


@NEEDS_FLASH
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


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_cell_states_equal_the_full_forward(pre_norm, packed):
    """The last layer at `<cls>` only gives forward's cell embedding, logits and gradients."""
    gene_ids, values, padding = padded_batch()
    packing = Packing.from_padding(padding) if packed else None
    net = model(pre_norm).train()  # train-mode maths, dropout 0
    full = net(gene_ids, values, padding, packing, heads=("cls_logits",))
    cells = net(gene_ids, values, padding, packing, heads=("cls_logits",), cells_only=True)
    assert set(cells) == {"cell_emb", "cls_logits"}
    for key in cells:
        torch.testing.assert_close(cells[key], full[key], rtol=1e-5, atol=1e-5)
    grads = []
    for out in (full, cells):
        net.zero_grad()
        out["cls_logits"].logsumexp(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="cells_only"):
        net(gene_ids, values, padding, heads=("expr",), cells_only=True)


def test_cell_states_run_every_token_where_hooks_watch_the_last_layer():
    gene_ids, values, padding = padded_batch()
    net = model().eval()
    seen = []
    last = net.transformer_encoder.layers[-1].linear2
    handle = last.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        watched = net.cell_states(gene_ids, values, padding)
    handle.remove()
    with torch.no_grad():
        unwatched = net.cell_states(gene_ids, values, padding)
    assert seen == [torch.Size([len(LENGTHS), 10, 32])]  # every token, as in forward
    torch.testing.assert_close(watched, unwatched, rtol=1e-5, atol=1e-5)


def test_fused_kernels_equal_the_plain_model():
    """`fuse` (torch.compile, dynamic shapes) gives the same outputs and gradients, packed
    and padded, and falls back to the plain modules where a hook watches one of them."""
    gene_ids, values, padding = padded_batch()
    packing = Packing.from_padding(padding)
    net = model().train()  # dropout 0
    labels = torch.tensor([0, 1, 2, 3])

    def run(fused, packing):
        net.fuse(fused).zero_grad()
        out = net(gene_ids, values, padding, packing, heads=("cls_logits",), cells_only=True)
        torch.nn.functional.cross_entropy(out["cls_logits"], labels).backward()
        return out["cls_logits"], [p.grad.clone() for p in net.parameters() if p.grad is not None]

    for layout in (packing, None):
        (plain, plain_grads), (fused, fused_grads) = run(False, layout), run(True, layout)
        assert not scgpt._Compiled.failed  # compiled, not the plain functions again
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        for a, b in zip(fused_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    seen = []
    norm = net.transformer_encoder.layers[0].norm2
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        hidden = net.fuse()(gene_ids, values, padding, packing)["hidden"]
    handle.remove()
    assert seen == [torch.Size([sum(LENGTHS), 32])]
    torch.testing.assert_close(
        hidden, net.fuse(False)(gene_ids, values, padding, packing)["hidden"]
    )


@NEEDS_FLASH
def test_fused_cells_only_path_matches_plain_on_gpu():
    """bf16, FlashAttention: fused kernels and `<cls>`-only last layer vs the plain forward."""
    gene_ids, values, padding = (t.cuda() for t in padded_batch(width=64, lengths=(64, 30, 3, 50)))
    packing = Packing.from_padding(padding)
    net = model().cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = net(gene_ids, values, padding)["cls_logits"].float()
        fast = net.fuse()(gene_ids, values, padding, packing, ["cls_logits"], True)["cls_logits"]
    torch.testing.assert_close(fast.float(), plain, rtol=0.05, atol=0.05)


def test_fused_kernels_fall_back_to_plain_functions_where_compiling_fails(monkeypatch, caplog):
    """No working compiler (here: a C++ compiler that does not exist): one warning, and the
    model runs on, unfused, with the same results."""
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(scgpt._Compiled, "failed", False)
    monkeypatch.setattr(scgpt, "_compiled", functools.cache(scgpt._Compiled))
    torch._dynamo.reset()
    gene_ids, values, padding = padded_batch()
    net = model().eval()
    with torch.no_grad():
        plain = net(gene_ids, values, padding)["hidden"]
        with caplog.at_level("WARNING", logger="superweights.model.scgpt"):
            fused = net.fuse()(gene_ids, values, padding)["hidden"]
    assert scgpt._Compiled.failed
    assert len([r for r in caplog.records if "fused kernels are off" in r.message]) == 1
    torch.testing.assert_close(fused, plain)
