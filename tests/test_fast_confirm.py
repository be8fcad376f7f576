"""Null draws in reduced precision (`scores.PRECISIONS`) equal the fp32 reference: every null
effect within 1 % of the null draws' standard deviation, the same p, q and verdicts."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from superweights.confirm import ConfirmSettings, confirm_super_weights, null_positions
from superweights.errors import UserError
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.scores import (
    CellTypeScore,
    MaskedExpressionScore,
    split_linear,
    varlen_attention,
)

PAD_ID = 97
DOWN = "transformer_encoder.layers.{}.linear2"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ONE_THREAD = pytest.mark.usefixtures("one_thread")  # CPU tests (the GPU ones run without it)


def model(pre_norm=False, d=32, layers=3, device="cpu"):
    torch.manual_seed(0)
    config = ScGPTConfig(
        ntoken=PAD_ID + 1, d_model=d, nhead=4, d_hid=d, nlayers=layers, n_cls=5,
        pad_token_id=PAD_ID, pre_norm=pre_norm,
    )  # fmt: skip
    net = ScGPTModel(config).to(device).eval()
    with torch.no_grad():  # a weight that matters
        net.transformer_encoder.layers[1].linear2.weight[3, 7] = 20.0
    return net


def batches(n_batches=3, cells=8, width=24, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        gene_ids = torch.randint(0, PAD_ID, (cells, width), generator=g)
        values = torch.randint(0, 51, (cells, width), generator=g).float()
        lengths = torch.randint(3, width + 1, (cells,), generator=g)
        padding = torch.arange(width)[None, :] >= lengths[:, None]
        gene_ids[padding], values[padding] = PAD_ID, -2.0
        labels = torch.randint(0, 5, (cells,), generator=g)
        batch = {"gene_ids": gene_ids, "values": values, "padding_mask": padding, "labels": labels}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def null_effects(score, net, base, positions):
    return (base[None, :] - score.zeroed_scores(net, DOWN.format(1), positions)).mean(1).numpy()


def positions_of(net, n=40):
    weight = net.transformer_encoder.layers[1].linear2.weight.detach()
    _, nulls = null_positions(weight, 3, 7, n, 2.0, np.random.default_rng(0))
    return [(3, 7), *nulls]


def score_of(kind, net, cells, precision):
    if kind == "cell type":
        return CellTypeScore(net, cells, precision=precision)
    return MaskedExpressionScore(net, cells, 0.3, seed=1, precision=precision)


@ONE_THREAD
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
@pytest.mark.parametrize("kind", ["cell type", "masked expression"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_reduced_precision_null_effects_are_the_fp32_ones(precision, kind, pre_norm, monkeypatch):
    net, cells = model(pre_norm), batches()
    positions = positions_of(net)
    reference = score_of(kind, net, cells, "fp32")
    base = reference(net)
    expected = null_effects(reference, net, base, positions)
    monkeypatch.setattr("superweights.scores.DEFAULT_TOKENS_PER_FORWARD", 200)  # several stacks
    got = null_effects(score_of(kind, net, cells, precision), net, base, positions)
    sd = expected[1:].std(ddof=1)
    assert sd > 1e-6  # the draws differ
    assert np.abs(got - expected).max() < 0.01 * sd


@ONE_THREAD
def test_split_linear_keeps_fp32_accuracy():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40)
    exact = F.linear(x.double(), w.double(), b.double())
    error = (split_linear(x, w, b).double() - exact).abs().max()
    assert error <= 4 * (F.linear(x, w, b).double() - exact).abs().max() + 1e-6


@ONE_THREAD
def test_confirmation_in_reduced_precision_gives_the_reference_verdicts():
    net, cells = model(), batches()
    candidates = pd.DataFrame({"module": [DOWN.format(1)] * 3, "row": [3, 0, 5], "col": [7, 1, 2]})
    settings = ConfirmSettings(n_null=59, n_boot=50, topk_sweep=(), min_effect=0.001)
    tables = {}
    for precision in ("fp32", "tf32x3"):
        score = CellTypeScore(net, cells, precision=precision)
        tables[precision] = confirm_super_weights(net, candidates, score, settings=settings)
    fast, reference = tables["tf32x3"], tables["fp32"]
    assert reference.table["effect"].iloc[0] > 100 * reference.table["effect"].iloc[1:].abs().max()
    columns = ["p_value", "q_value", "confirmed"]
    pd.testing.assert_frame_equal(fast.table[columns], reference.table[columns])
    sd = reference.nulls.groupby("candidate")["effect"].std()
    error = (fast.nulls["effect"] - reference.nulls["effect"]).abs()
    assert (error < 0.01 * reference.nulls["candidate"].map(sd)).all()


@ONE_THREAD
def test_an_unknown_precision_is_a_user_error():
    net = model()
    with pytest.raises(UserError, match="precision must be one of"):
        CellTypeScore(net, batches(), precision="fp16")


@CUDA
def test_varlen_attention_equals_masked_attention_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(5, 4, 30, 16, device="cuda", generator=g) for _ in range(3))
    lengths = torch.tensor([30, 7, 1, 19, 25], device="cuda")
    keep = (torch.arange(30, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    got = varlen_attention(q, k, v, keep)
    real = keep[:, 0, 0, :, None].expand(-1, -1, 16)
    for h in range(4):
        torch.testing.assert_close(got[:, h][real], expected[:, h][real], rtol=1e-5, atol=1e-5)
    first = varlen_attention(q[:, :, :1], k, v, keep)
    torch.testing.assert_close(first, expected[:, :, :1], rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("kind", ["cell type", "masked expression"])
def test_reduced_precision_on_the_gpu_equals_fp32(kind):
    net, cells = model(d=128, layers=4, device="cuda"), batches(4, 16, 96, device="cuda")
    positions = positions_of(net, 60)
    reference = score_of(kind, net, cells, "fp32")
    base = reference(net)
    with reference.from_layer(1):
        expected = null_effects(reference, net, base, positions)
        got = null_effects(score_of(kind, net, cells, "tf32x3"), net, base, positions)
    sd = expected[1:].std(ddof=1)
    assert np.abs(got - expected).max() < 0.01 * sd
