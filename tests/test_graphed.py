"""Batches in few shapes (`Collate(bucket=...)`) and training steps replayed from CUDA graphs."""

import copy

import pytest
import torch
import torch.nn.functional as F

from superweights.model.graphed import GraphedSteps, capturable_adamw, make_capturable
from superweights.model.scgpt import ScGPTConfig, ScGPTModel, flash_attention_available
from superweights.model.tokens import IGNORE_LABEL, Collate

PAD_ID = 47

NEEDS_FLASH = pytest.mark.skipif(
    not (torch.cuda.is_available() and flash_attention_available(torch.device("cuda"))),
    reason="CUDA graphs of packed steps need a GPU with FlashAttention",
)


def cells(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"gene_ids": torch.randint(0, PAD_ID, (n,), generator=g),
         "values": torch.randint(1, 51, (n,), generator=g).float(), "label": torch.tensor(i % 3)}
        for i, n in enumerate(lengths)
    ]  # fmt: skip


def test_bucketed_batches_come_in_few_shapes():
    collate = Collate(PAD_ID, pack=True, bucket=16, width=20)
    first, second = collate(cells([20, 7, 3])), collate(cells([12, 12, 5], seed=1))
    for batch, real in ((first, 30), (second, 29)):
        assert batch["gene_ids"].shape == (4, 20)  # the cells and one filler row
        packing = batch["packing"]
        assert len(packing.index) == 32  # real tokens rounded up to a multiple of 16
        assert packing.max_len == 20
        assert packing.cu_seqlens[-2] == real  # the filler is the last sequence
        assert batch["labels"][-1] == IGNORE_LABEL
        assert (batch["gene_ids"][-1] == PAD_ID).all()
        assert not batch["padding_mask"][-1, : 32 - real].any()
    assert torch.equal(first["labels"][:3], torch.tensor([0, 1, 2]))
    exact = Collate(PAD_ID, pack=True, bucket=16, width=20)(cells([16]))
    assert len(exact["packing"].index) == 32  # the filler has at least one token
    for bad in ({"bucket": 16}, {"bucket": 30, "pack": True, "width": 20}):
        with pytest.raises(ValueError, match="bucket"):
            Collate(PAD_ID, **bad)


def test_a_resumed_optimiser_is_made_capturable_again():
    """`load_state_dict` brings a saved learning rate back as a number (or a CPU tensor);
    a replayed step reads a device tensor that the scheduler fills."""
    weight = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.AdamW([weight], lr=0.5)
    weight.grad = torch.ones(3)
    saved.step()
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    optimizer.load_state_dict(saved.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.5
    make_capturable(optimizer, torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == 0.5
    assert group["capturable"]
    lr = group["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 2))
    scheduler.step()
    assert group["lr"] is lr  # filled in place, where replays read it
    assert float(lr) == pytest.approx(0.5 / 3)


def test_filler_row_changes_no_cell_result():
    torch.manual_seed(0)
    config = ScGPTConfig(ntoken=50, d_model=32, nhead=4, d_hid=24, nlayers=2, n_cls=3,
                         pad_token_id=PAD_ID, dropout=0.0)  # fmt: skip
    model = ScGPTModel(config).eval()
    items = cells([9, 5, 2])
    plain = Collate(PAD_ID, pack=True)(items)
    bucketed = Collate(PAD_ID, pack=True, bucket=8, width=12)(items)
    with torch.no_grad():
        outs = [
            model(b["gene_ids"], b["values"], b["padding_mask"], b["packing"], cells_only=True)
            for b in (plain, bucketed)
        ]
    torch.testing.assert_close(outs[1]["cls_logits"][:3], outs[0]["cls_logits"])
    loss = F.cross_entropy(outs[1]["cls_logits"], bucketed["labels"])
    torch.testing.assert_close(loss, F.cross_entropy(outs[0]["cls_logits"], plain["labels"]))


@NEEDS_FLASH
@pytest.mark.parametrize("fuse", [False, True])
def test_replayed_steps_equal_eager_steps_on_gpu(fuse):
    torch.manual_seed(0)
    config = ScGPTConfig(ntoken=50, d_model=64, nhead=4, d_hid=64, nlayers=3, n_cls=3,
                         pad_token_id=PAD_ID, dropout=0.0)  # fmt: skip
    eager = ScGPTModel(config).cuda().train().fuse(fuse)
    graphed = copy.deepcopy(eager)
    start = [p.detach().clone() for p in graphed.parameters()]
    collate = Collate(PAD_ID, pack=True, bucket=32, width=40)
    batches = [collate(cells([40, 17, 9, 30][: 2 + i % 3], seed=i)) for i in range(6)]

    def loss_fn(model, batch):
        packing = batch["packing"]
        out = model(batch["gene_ids"], batch["values"], batch["padding_mask"], packing,
                    ("cls_logits",), True)  # fmt: skip
        return F.cross_entropy(out["cls_logits"].float(), batch["labels"])

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    opts = [capturable_adamw(m.parameters(), 1e-3, torch.device("cuda")) for m in (eager, graphed)]
    steps = GraphedSteps(graphed, loss_fn, opts[1], 1.0, autocast)
    losses = {"eager": [], "graphed": []}
    for i, batch in enumerate(batches):
        for name, model, opt in (("eager", eager, opts[0]), ("graphed", graphed, opts[1])):
            if name == "graphed" and i > 0:
                losses[name].append(float(steps(batch)))
                continue
            device_batch = {k: v.to("cuda") for k, v in batch.items()}
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model, device_batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[name].append(float(loss))
    assert len(steps.graphs) == len({(b["gene_ids"].shape, len(b["packing"].index))
                                     for b in batches[1:]})  # fmt: skip
    torch.testing.assert_close(losses["graphed"], losses["eager"], rtol=2e-2, atol=2e-2)
    for a, b in zip(graphed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    moved = [not torch.equal(a, b) for a, b in zip(graphed.parameters(), start, strict=True)]
    assert sum(moved) > len(moved) // 2  # the replayed steps did train


@NEEDS_FLASH
@pytest.mark.parametrize("fuse", [False, True])
def test_replays_draw_new_dropout_masks_on_gpu(fuse):
    """Dropout (eager, fused and in attention) draws new masks at every replay: with the
    learning rate at 0 the weights stay, so only the masks can change the loss."""
    torch.manual_seed(0)
    config = ScGPTConfig(ntoken=50, d_model=64, nhead=4, d_hid=64, nlayers=2, n_cls=3,
                         pad_token_id=PAD_ID, dropout=0.5)  # fmt: skip
    model = ScGPTModel(config).cuda().train().fuse(fuse)
    batch = Collate(PAD_ID, pack=True, bucket=32, width=40)(cells([40, 17, 9]))
    optimizer = capturable_adamw(model.parameters(), 0.0, torch.device("cuda"))

    def loss_fn(model, batch):
        out = model(batch["gene_ids"], batch["values"], batch["padding_mask"], batch["packing"],
                    ("cls_logits",), True)  # fmt: skip
        return F.cross_entropy(out["cls_logits"].float(), batch["labels"])

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    with autocast():
        loss_fn(model, {k: v.to("cuda") for k, v in batch.items()}).backward()
    optimizer.step()  # the optimiser's state, as the first (eager) training step makes it
    before = [p.detach().clone() for p in model.parameters()]
    steps = GraphedSteps(model, loss_fn, optimizer, 1.0, autocast)
    losses = [float(steps(batch)) for _ in range(4)]
    assert len(set(losses)) == 4, losses
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)
