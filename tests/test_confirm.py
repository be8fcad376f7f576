"""Model-agnostic confirmation: planted super weights confirmed and tiered by their
mechanism, decoys rejected, p-values calibrated under the null, reproducible, and bad
inputs refused before any work."""

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import cell_batch, llama, plant_llama
from superweights.confirm import (
    TIERS,
    ConfirmSettings,
    benjamini_hochberg,
    confirm_super_weights,
)
from superweights.errors import UserError
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.probe import find_super_weights

DOWN = "model.layers.{}.mlp.down_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n: int = 12, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (n, 12), generator=generator)}


def agreement_score(model, inputs):
    """log p of the unedited model's own top prediction, averaged per sequence."""
    with torch.no_grad():
        targets = model(**inputs).logits.argmax(-1)

    def score(m):
        logp = torch.log_softmax(m(**inputs).logits.double(), dim=-1)
        return logp.gather(-1, targets[..., None]).squeeze(-1).mean(-1)

    return score


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def planted():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    with torch.no_grad():  # decoy: a large weight on an input column that is always 0
        mlp = model.model.layers[2].mlp
        mlp.up_proj.weight[13] = 0.0
        mlp.down_proj.weight[11, 13] = 6.0
    return model


def plant_on_first_token(model, layer: int, row: int, col: int, weight: float = 5.0):
    """A super weight whose input spikes on token 0 only (an attention-sink-like first token):
    token 0's embedding lies along 8 dimensions that every other token has negative, and
    unit `col` of the layer's MLP gates on them; W[row, col] turns it into a massive
    activation of channel `row` on token 0 alone."""
    emb, mlp, dims = model.model.embed_tokens.weight, model.model.layers[layer].mlp, range(8)
    with torch.no_grad():
        emb[:, dims] = -0.05
        emb[0] = 0.0
        emb[0, dims] = 1.0
        for proj in (mlp.up_proj, mlp.gate_proj):
            proj.weight[col] = 0.0
            proj.weight[col, dims] = 3.5
        mlp.down_proj.weight[row, col] = weight


def first_token_batch(n: int = 12) -> dict:
    ids = batch(n)["input_ids"] % 99 + 1
    ids[:, 0] = 0
    return {"input_ids": ids}


@pytest.fixture(scope="module")
def sink():
    model = llama()
    plant_on_first_token(model, layer=1, row=5, col=7)
    return model


def test_a_massive_activation_that_matters_and_is_recovered_is_a_super_weight(sink):
    inputs = first_token_batch()
    probe = find_super_weights(sink, inputs)
    result = confirm_super_weights(sink, probe, agreement_score(sink, inputs), n_null=39)
    (row,) = result.to_frame().itertuples()
    assert (row.layer, row.row, row.col) == (1, 5, 7) and row.massive
    assert row.tier == "super weight" and result.super_weights == ["L1[5,7]"]
    assert row.reason.startswith("super weight: confirmed")
    assert row.recovered > 0.9 and row.p_contribution == pytest.approx(1 / 40)
    assert row.effect > row.contribution_null_q95 and row.effect > row.topk_effect
    # Every sequence's spike sits on token 0 with the same value: a fixed bias, so writing
    # its mean back costs nothing while zeroing it costs as much as pruning the weight.
    assert row.spike_sd == pytest.approx(0.0, abs=1e-3 * row.spike_mean)
    assert abs(row.mean_spike_effect) < 1e-6 and row.zero_spike_effect > 0.5 * row.effect
    kinds = result.nulls.groupby("kind").size()
    assert dict(kinds) == {"contribution": 39, "magnitude": 39}
    contribution = result.nulls[result.nulls["kind"] == "contribution"]
    assert (contribution["col"] == 7).any()  # the same input column is allowed there
    assert result.spike_values["L1[5,7]"].shape == (12,)


def test_a_large_effect_without_a_massive_activation_is_an_important_weight(sink):
    inputs = first_token_batch()
    frame = pd.DataFrame({"module": [DOWN.format(1)], "row": [5], "col": [7], "accepted": [False]})
    result = confirm_super_weights(sink, frame, agreement_score(sink, inputs), n_null=39)
    (row,) = result.to_frame().itertuples()
    assert row.confirmed and row.tier == "important weight" and not row.massive
    assert "no massive activation" in row.reason and result.super_weights == []


def test_top_k_control_counts_every_weight_matrix_of_the_layers(sink):
    result = confirm_super_weights(
        sink, pd.DataFrame({"module": [DOWN.format(1)], "row": [5], "col": [7]}),
        agreement_score(sink, first_token_batch()), n_null=5,
    )  # fmt: skip
    layers = sink.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters() if p.ndim == 2)
    assert set(result.topk["of_weights"]) == {per_layer * len(layers)}
    assert set(result.topk["n_matrices"]) == {7 * len(layers)}  # q, k, v, o, gate, up, down
    assert result.topk["matrices_hit"].max() > len(layers)  # not the down-projections only


def ignored_spike_model() -> ScGPTModel:
    """Pre-LN scGPT whose last layer adds a massive activation to channel 4 of every token
    through W[4, 6] of its down-projection, a channel the classifier does not read."""
    torch.manual_seed(0)
    config = ScGPTConfig(ntoken=60, d_model=32, nhead=4, d_hid=48, nlayers=3, n_cls=3,
                         pad_token_id=59, pre_norm=True)  # fmt: skip
    model = ScGPTModel(config).eval()
    last = model.transformer_encoder.layers[2]
    with torch.no_grad():
        last.linear1.weight[6] = 0.0
        last.linear1.bias[6] = 20.0
        last.linear2.weight[4, 6] = 50.0
        model.cls_decoder._decoder[0].weight[:, 4] = 0.0
    return model


def test_a_massive_activation_that_downstream_layers_ignore_is_not_confirmed():
    model, cells = ignored_spike_model(), cell_batch()
    probe = find_super_weights(model, cells)
    assert (2, 4, 6) in {(c.layer, c.row, c.col) for c in probe.candidates}
    labels = torch.tensor([0, 1, 2, 0])

    def score(m):
        logits = m(cells["gene_ids"], cells["values"], cells["padding_mask"])["cls_logits"]
        return torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)

    table = confirm_super_weights(model, probe, score, n_null=19).to_frame()
    row = table[(table["layer"] == 2) & (table["row"] == 4)].iloc[0]
    assert row.massive and row.tier == "not confirmed" and not row.confirmed
    assert row.effect == pytest.approx(0.0, abs=1e-9) and "min_effect" in row.reason


def test_a_weight_acting_on_every_token_is_important_not_super(planted):
    """`plant_llama` makes input channel 7 spike on every token, so pruning W[5, 7] acts on
    all of them: restoring the activation on each sequence's spike token alone recovers
    little, and the weight is confirmed but not a super weight."""
    inputs = batch()
    candidates = pd.DataFrame(
        {"module": [DOWN.format(1), DOWN.format(2)], "row": [5, 11], "col": [7, 13]}
    )
    before = snapshot(planted)
    result = confirm_super_weights(planted, candidates, agreement_score(planted, inputs), n_null=39)
    for key, value in before.items():
        assert torch.equal(planted.state_dict()[key], value), key
    table = result.to_frame().set_index("candidate")
    real, decoy = table.loc["L1[5,7]"], table.loc["L2[11,13]"]
    assert real.confirmed and real.effect > 0.05 and real.ci_low > 0
    assert real.p_value == pytest.approx(1 / 40) and real.effect > real.null_q95
    assert real.effect > real.topk_effect and real.tier == "important weight"
    assert real.recovered < 0.5 and "recovers" in real.reason and "super weight:" in real.reason
    assert "largest |w|" in real.null  # nothing else of the matrix is near |3.0|
    assert not decoy.confirmed and decoy.effect == pytest.approx(0.0, abs=1e-9)
    assert "min_effect" in decoy.reason and decoy.tier == "not confirmed"
    assert set(result.nulls["candidate"]) == {"L1[5,7]", "L2[11,13]"}
    assert len(result.nulls) == 2 * 2 * 39  # two candidates, two nulls
    own = result.nulls[(result.nulls["candidate"] == "L1[5,7]")
                       & (result.nulls["kind"] == "magnitude")]  # fmt: skip
    assert not ((own["row"] == 5) | (own["col"] == 7)).any()  # own row and column excluded
    assert list(result.topk["decides"]) == [True, False, False, False]
    assert result.example_effects["L1[5,7]"].shape == (12,)


def test_probe_result_feeds_confirmation_and_same_seed_same_table(planted):
    inputs = batch()
    probe = find_super_weights(planted, inputs)
    score = agreement_score(planted, inputs)
    groups = np.repeat(np.arange(4), 3)
    first = confirm_super_weights(planted, probe, score, n_null=19, seed=3, groups=groups)
    again = confirm_super_weights(planted, probe, score, n_null=19, seed=3, groups=groups)
    pd.testing.assert_frame_equal(first.to_frame(), again.to_frame())
    pd.testing.assert_frame_equal(first.nulls, again.nulls)
    assert list(first.to_frame()["candidate"]) == ["L1[5,7]"]
    assert first.to_frame()["n_groups"].iloc[0] == 4


class TinyDecoder(torch.nn.Module):
    """Two residual MLP blocks named like a Hugging Face decoder, and a classifier."""

    def __init__(self, d: int = 16, h: int = 48, classes: int = 5):
        super().__init__()
        torch.manual_seed(6)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(2):
            block = torch.nn.Module()
            block.mlp = torch.nn.Module()
            block.mlp.up_proj = torch.nn.Linear(d, h)
            block.mlp.down_proj = torch.nn.Linear(h, d)
            self.model.layers.append(block)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        for block in self.model.layers:
            x = x + block.mlp.down_proj(torch.relu(block.mlp.up_proj(x)))
        return self.head(x)


def test_p_values_are_uniform_without_a_super_weight():
    """50 random ordinary weights of one matrix against magnitude-matched nulls: with 19
    null draws p takes values k/20, so P(p <= 0.1) = 0.1 exactly under the null. The count
    below 0.1 is then Binomial(50, 0.1): mean 5, sd 2.1; we accept 1..11 (about 3 sd)."""
    model = TinyDecoder().double()
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    labels = model(x).argmax(-1)

    def score(m):
        return torch.log_softmax(m(x), -1).gather(1, labels[:, None]).squeeze(1)

    rng = np.random.default_rng(0)
    weight = model.model.layers[1].mlp.down_proj.weight
    rows = rng.integers(0, weight.shape[0], 50)
    cols = rng.integers(0, weight.shape[1], 50)
    candidates = pd.DataFrame({"module": DOWN.format(1), "row": rows, "col": cols})
    settings = ConfirmSettings(n_null=19, n_boot=50, topk_sweep=())
    result = confirm_super_weights(model, candidates, score, settings=settings)
    p = result.to_frame()["p_value"]
    assert len(p) == len(candidates.drop_duplicates()) >= 45
    assert 1 <= (p <= 0.1).sum() <= 11
    assert not result.to_frame()["confirmed"].any()
    assert set(result.to_frame()["tier"]) == {TIERS[2]}
    assert "too small" in result.warning  # 50 candidates cannot pass BH with 19 draws
    assert result.warning in result.to_frame()["reason"].iloc[0]


def test_benjamini_hochberg():
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.5]))
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])  # p * 4 / rank, then running min


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"module": [DOWN.format(1)], "row": [5]}), "lacks column"),
        (pd.DataFrame({"module": [DOWN.format(1)], "row": [5], "col": [999]}), "outside"),
        (pd.DataFrame({"module": ["model.nope"], "row": [5], "col": [7]}), "not a linear"),
        (
            pd.DataFrame({"module": [DOWN.format(1)], "row": [5], "col": [7], "weight": [1.0]}),
            "another checkpoint",
        ),
    ],
)
def test_bad_candidates_are_refused(planted, frame, message):
    with pytest.raises(UserError, match=message):
        confirm_super_weights(planted, frame, agreement_score(planted, batch()), n_null=5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda s: s.reshape(3, 4), "1-D"),
        (lambda s: s.clone().fill_(float("nan")), "non-finite"),
        (lambda s: [1.0], "1-D"),
    ],
)
def test_bad_scores_are_refused_and_weights_restored(planted, bad, message):
    score = agreement_score(planted, batch())
    before = snapshot(planted)
    frame = pd.DataFrame({"module": [DOWN.format(1)], "row": [5], "col": [7]})
    with pytest.raises(UserError, match=message):
        confirm_super_weights(planted, frame, lambda m: bad(score(m)), n_null=5)
    calls = []

    def shrinking(m):  # right on the first call, one example short afterwards
        calls.append(1)
        return score(m)[: 12 if len(calls) == 1 else 11]

    with pytest.raises(UserError, match="returned 11 scores"):
        confirm_super_weights(planted, frame, shrinking, n_null=5)
    for key, value in before.items():
        assert torch.equal(planted.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("low", "high", "words"), [(-2e-6, 1e-6, "includes 0"), (-5e-6, -1e-6, "lies below 0")]
)
def test_a_rejected_ci_is_described_as_it_lies(low, high, words):
    """A weight whose pruning helps the model has its CI below 0, not around it."""
    from types import SimpleNamespace

    from superweights.confirm import ConfirmSettings, _verdict

    row = SimpleNamespace(q_value=1.0, p_value=1.0, n_null=99, null="band", effect=-3e-6,
                          ci_low=low, ci_high=high, topk_k=10, topk_effect=3e-5, massive=True,
                          q_contribution=1.0, p_contribution=1.0, contribution_null="band",
                          recovered=float("nan"))  # fmt: skip
    tier, reason = _verdict(row, ConfirmSettings(), "")
    assert tier == "not confirmed" and f"[{low:.4g}, {high:.4g}] {words}" in reason
