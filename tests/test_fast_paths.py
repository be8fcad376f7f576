"""Fast paths of the scores equal the plain path: packed batches and stacked conditions."""

import contextlib

import pandas as pd
import pytest
import torch

from superweights.confirm import ConfirmSettings, confirm_super_weights
from superweights.editing import zeroed
from superweights.model.scgpt import Packing, ScGPTConfig, ScGPTModel
from superweights.scores import CellTypeScore, MaskedExpressionScore

PAD_ID = 47
DOWN = "transformer_encoder.layers.{}.linear2"

pytestmark = pytest.mark.usefixtures("one_thread")


def model(pre_norm=False):
    torch.manual_seed(0)
    config = ScGPTConfig(
        ntoken=50, d_model=32, nhead=4, d_hid=24, nlayers=3, n_cls=5, pad_token_id=PAD_ID,
        pre_norm=pre_norm,
    )  # fmt: skip
    net = ScGPTModel(config).eval()
    with torch.no_grad():  # a weight that matters, so that pruning it moves the scores
        net.transformer_encoder.layers[1].linear2.weight[3, 7] = 20.0
    return net


def batches(lengths=((9, 5, 2, 7), (10, 3, 6)), width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for cells in lengths:
        shape = (len(cells), width)
        gene_ids = torch.randint(0, PAD_ID, shape, generator=g)
        values = torch.randint(0, 51, shape, generator=g).float()
        padding = torch.arange(width)[None, :] >= torch.tensor(cells)[:, None]
        gene_ids[padding], values[padding] = PAD_ID, -2.0
        labels = torch.randint(0, 5, (len(cells),), generator=g)
        out.append({"gene_ids": gene_ids, "values": values, "padding_mask": padding,
                    "labels": labels})  # fmt: skip
    return out


def scores(kind, net, packed):
    if kind == "cell type":
        return CellTypeScore(net, batches(), packed=packed)
    return MaskedExpressionScore(net, batches(), 0.3, seed=1, packed=packed)


def test_packing_repeat_is_the_packing_of_the_stacked_batch():
    padding = batches()[0]["padding_mask"]
    repeated = Packing.from_padding(padding).repeat(3)
    stacked = Packing.from_padding(padding.repeat(3, 1))
    assert torch.equal(repeated.index, stacked.index)
    assert torch.equal(repeated.cu_seqlens, stacked.cu_seqlens)
    assert repeated.max_len == stacked.max_len and repeated.n_cells == 12


@pytest.mark.parametrize("kind", ["cell type", "masked expression"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_packed_scores_equal_padded_scores(kind, pre_norm):
    net = model(pre_norm)
    padded, packed = scores(kind, net, False), scores(kind, net, True)
    assert packed.packings[0] is not None and padded.packings[0] is None
    torch.testing.assert_close(packed(net), padded(net), rtol=1e-5, atol=1e-5)
    with packed.from_layer(2), padded.from_layer(2), zeroed(net, [(DOWN.format(2), 1, 2)]):
        torch.testing.assert_close(packed(net), padded(net), rtol=1e-5, atol=1e-5)
    if kind == "cell type":
        torch.testing.assert_close(packed.log_probs(net), padded.log_probs(net))


@pytest.mark.parametrize("kind", ["cell type", "masked expression"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_stacked_conditions_equal_pruning_each_weight(kind, packed, pre_norm, monkeypatch):
    net = model(pre_norm)
    score = scores(kind, net, packed)
    positions = [(3, 7), (0, 0), (5, 11), (3, 2), (31, 23)]
    expected = []
    for row, col in positions:
        with zeroed(net, [(DOWN.format(1), row, col)]):
            expected.append(score(net))
    expected = torch.stack(expected)
    assert (expected[0] - score(net)).abs().max() > 1e-3  # the test can tell weights apart
    monkeypatch.setattr("superweights.scores.DEFAULT_TOKENS_PER_FORWARD", 50)  # 3 chunks
    got = score.zeroed_scores(net, DOWN.format(1), positions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with score.from_layer(1):
        cached = score.zeroed_scores(net, DOWN.format(1), positions)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert score.batches_conditions(DOWN.format(1))
    assert not score.batches_conditions("transformer_encoder.layers.1.linear1")


class Plain(CellTypeScore):
    """The cell-type score without any fast path: every pruned weight runs the whole model."""

    batches_conditions = None

    def from_layer(self, layer):
        return contextlib.nullcontext()


@pytest.mark.parametrize("packed", [False, True])
def test_confirmation_through_fast_paths_equals_the_plain_loop(packed):
    net = model()
    candidates = pd.DataFrame({"module": [DOWN.format(1)] * 2, "row": [3, 0], "col": [7, 1]})
    settings = ConfirmSettings(n_null=9, n_boot=50, topk_sweep=())
    fast = confirm_super_weights(net, candidates, CellTypeScore(net, batches(), packed),
                                 settings=settings)  # fmt: skip
    plain = confirm_super_weights(net, candidates, Plain(net, batches(), False), settings=settings)
    assert abs(fast.table.loc[0, "effect"]) > 0.01  # a planted weight: effects are not ~0
    columns = ["effect", "ci_low", "ci_high", "p_value", "null_mean", "restore_spike_effect"]
    pd.testing.assert_frame_equal(fast.table[columns], plain.table[columns], rtol=1e-4)
    pd.testing.assert_frame_equal(fast.nulls, plain.nulls, rtol=1e-4, atol=1e-6)
