"""Super-weight probe: planted weights are recovered exactly; the model is left untouched."""

import json
from dataclasses import fields

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import cell_batch, llama, plant_llama
from superweights.errors import UserError
from superweights.model.scgpt import Packing, ScGPTConfig, ScGPTModel
from superweights.probe import (
    Candidate,
    LayerStat,
    _SampleRows,
    find_super_weights,
    layernorm_outliers,
)


def token_batch(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (2, 16), generator=generator)}


def scgpt(pre_norm: bool, seed: int = 0) -> ScGPTModel:
    torch.manual_seed(seed)
    config = ScGPTConfig(
        ntoken=60, d_model=32, nhead=4, d_hid=48, nlayers=3, n_cls=3, pad_token_id=59,
        pre_norm=pre_norm,
    )  # fmt: skip
    return ScGPTModel(config).eval()


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def coordinates(result) -> set:
    return {(c.layer, c.row, c.col) for c in result.candidates}


def test_llama_single_planted_weight_is_recovered_exactly():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    result = find_super_weights(model, token_batch())
    assert coordinates(result) == {(1, 5, 7)}
    (cand,) = result.candidates
    assert cand.module == "model.layers.1.mlp.down_proj" and cand.round == 1
    assert cand.weight == pytest.approx(3.0)
    assert cand.contribution == pytest.approx(1.0, abs=0.05)
    assert cand.input_ratio >= 100 and cand.output_ratio >= 100
    assert result.settings["modules"][1] == "model.layers.1.mlp.down_proj"
    # Round 2 runs with the weight zeroed: the spike is gone and the search stops.
    frame = result.layers_frame()
    assert result.rounds == 2 and result.stopped == "no spike left"
    assert len(frame) == 2 * 4 and set(frame["round"]) == {1, 2}
    second = frame.query("round == 2 and layer == 1").iloc[0]
    assert second.max_out < cand.output_value / 10
    # What the input spike still lights up is an ordinary weight of the same column.
    assert second.decision == "collateral" and second.col == 7 and second.row != 5
    assert second.collateral_of == "(1, 5, 7)" and second.weight_ratio < 10


def test_llama_two_planted_weights_in_different_layers_are_both_recovered():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    plant_llama(model, layer=3, row=40, col=30)
    result = find_super_weights(model, token_batch())
    assert coordinates(result) == {(1, 5, 7), (3, 40, 30)}
    assert result.stopped == "no spike left"
    assert len(result.layer_stats) == 4 * result.rounds
    assert all(1 <= c.round < result.rounds for c in result.candidates)


def plant_behind_a_diffuse_spike(model, layer: int = 1) -> None:
    """Layer `layer` gets a super weight W[5, 7] that spikes on token 0 only (about 3e4) and
    a larger diffuse spike in output channel 9 on every other token (about 1.4e5) made by
    40 weights W[9, 100:140] of equal share, none of which makes most of it."""
    emb, mlp = model.model.embed_tokens.weight, model.model.layers[layer].mlp
    sink, shared = range(8), range(8, 16)
    with torch.no_grad():
        emb[:, sink], emb[:, shared] = -0.05, 0.05
        emb[0] = 0.0
        emb[0, sink] = 1.0
        for proj in (mlp.up_proj, mlp.gate_proj):
            proj.weight[7] = 0.0
            proj.weight[7, sink] = 3.5
            proj.weight[100:140] = 0.0
            proj.weight[100:140, shared] = 1.0
        mlp.down_proj.weight[5, 7] = 5.0
        mlp.down_proj.weight[9, 100:140] = 10.0


def test_a_super_weight_behind_a_larger_diffuse_spike_is_found():
    model = llama()
    plant_behind_a_diffuse_spike(model)
    ids = token_batch()["input_ids"] % 99 + 1
    ids[:, 0] = 0
    result = find_super_weights(model, {"input_ids": ids})
    assert (1, 5, 7) in coordinates(result)
    assert not any(c.layer == 1 and c.row == 9 for c in result.candidates)
    frame = result.layers_frame().query("layer == 1")
    first, second = frame.iloc[0], frame.iloc[1]
    # Round 1 sees the diffuse spike, larger than the super weight's, and rejects it ...
    assert first.channel_out == 9 and first.decision == "rejected"
    assert "contribution" in first.reason and first.ratio_out >= 100
    # ... round 2 masks its channel and finds the super weight behind it.
    assert second.masked_channels == "9" and second.decision == "accepted"
    assert (second.row, second.col) == (5, 7) and second.max_out < first.max_out
    assert "candidate(s)" in result.summary() and "super weight(s)" not in result.summary()
    # Without the masking the search would have stopped after round 1 empty-handed.
    once = find_super_weights(model, {"input_ids": ids}, max_rounds=1)
    assert (1, 5, 7) not in coordinates(once)


def test_clean_model_gives_no_candidate_and_says_so(tmp_path):
    model = llama()
    result = find_super_weights(model, token_batch())
    assert not result.found and result.candidates == []
    assert result.rounds == 1 and result.stopped == "no spike left"
    assert result.summary().startswith("no candidate found")
    top = result.strongest(2)
    assert len(top) == 2 and top["ratio_out"].is_monotonic_decreasing
    assert (top["decision"] == "rejected").all() and top["reason"].str.len().gt(0).all()
    result.write(tmp_path)
    assert pd.read_csv(tmp_path / "candidates.tsv", sep="\t").empty
    assert list(pd.read_csv(tmp_path / "candidates.tsv", sep="\t").columns)[:4] == [
        "module", "layer", "row", "col",
    ]  # fmt: skip
    assert len(pd.read_csv(tmp_path / "layers.tsv", sep="\t")) == 4
    assert json.loads((tmp_path / "candidates.json").read_text())["found"] is False


def planted_scgpt(pre_norm: bool):
    """An scGPT model with a super weight planted at layer 1, W[5, 9] (hidden unit 9 boosted)."""
    model = scgpt(pre_norm)
    layer = model.transformer_encoder.layers[1]
    with torch.no_grad():
        layer.linear1.weight[9] *= 200
        layer.linear2.weight[5, 9] = 5.0
    return model


@pytest.mark.parametrize("pre_norm", [False, True])
def test_scgpt_planted_weight_is_recovered_with_padding(pre_norm):
    model = planted_scgpt(pre_norm)
    batch = cell_batch()
    before = snapshot(model)
    result = find_super_weights(model, batch)
    assert coordinates(result) == {(1, 5, 9)}
    assert_identical(model, before)
    (cand,) = result.candidates
    assert cand.module == "transformer_encoder.layers.1.linear2"
    assert not batch["padding_mask"][cand.item, cand.token]
    first = result.layers_frame().query("round == 1").set_index("layer")
    assert first["resid_max"].notna().all()
    if not pre_norm:  # post-LN: norm2 sees the residual sum that carries the spike
        assert first.loc[1, "resid_channel"] == 5 and first.loc[1, "resid_ratio"] > 20


@pytest.mark.parametrize("pre_norm", [False, True])
def test_packed_scgpt_run_gives_the_padded_run_statistics(pre_norm):
    model = planted_scgpt(pre_norm)
    batches = [cell_batch(seed) for seed in (1, 2)]
    batches[1]["values"][2, 3] = 500.0  # the spike in the second call, third cell
    batches[1]["padding_mask"][:2, 15:] = True

    def run(packed):
        def forward(m):
            for b in batches:
                packing = Packing.from_padding(b["padding_mask"]) if packed else None
                m(**b, packing=packing)

        return find_super_weights(model, forward, max_rounds=1).layers_frame()

    padded, packed = run(False), run(True)
    exact = ["item_in", "token_in", "channel_in", "item_out", "token_out", "channel_out",
             "row", "col", "decision", "resid_channel"]  # fmt: skip
    pd.testing.assert_frame_equal(packed[exact], padded[exact])
    numbers = ["max_in", "median_in", "max_out", "median_out", "contribution", "resid_max"]
    pd.testing.assert_frame_equal(packed[numbers], padded[numbers], rtol=1e-5)
    assert (padded["item_out"] >= 4).any()  # spikes in the second call are located there


def test_clean_scgpt_gives_no_candidate():
    for pre_norm in (False, True):
        assert not find_super_weights(scgpt(pre_norm), cell_batch()).found


@pytest.mark.parametrize("train", [False, True])
def test_weights_bit_identical_and_modes_preserved(train):
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    model.train(train)
    model.model.layers[2].train(not train)  # a mixed state must survive too
    modes = [m.training for m in model.modules()]
    before = snapshot(model)
    result = find_super_weights(model, token_batch())
    assert coordinates(result) == {(1, 5, 7)} and result.rounds == 2  # zeroing happened
    assert_identical(model, before)
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.backends.mha.get_fastpath_enabled()


def test_model_restored_when_the_forward_pass_fails():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    before = snapshot(model)
    calls = []

    def run(m):
        calls.append(1)
        if len(calls) == 2:  # after the planted weight was zeroed
            assert m.model.layers[1].mlp.down_proj.weight[5, 7] == 0
            raise RuntimeError("boom")
        m(**token_batch())

    with pytest.raises(RuntimeError, match="boom"):
        find_super_weights(model, run)
    assert_identical(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not model.training


def test_bf16_model():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    model = model.to(torch.bfloat16)
    before = snapshot(model)
    result = find_super_weights(model, token_batch())
    assert coordinates(result) == {(1, 5, 7)}
    assert_identical(model, before)


class Toy(nn.Module):
    """One down-projection fed directly with the given activations (HF decoder names)."""

    def __init__(self, h: int = 16, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = nn.Module()
        self.down = self.model.layers[0].mlp.down_proj = nn.Linear(h, d, bias=False)
        nn.init.normal_(self.down.weight, std=0.25)

    def forward(self, x, attention_mask=None):
        return self.down(x)


LOW = {"input_ratio": 50.0, "output_ratio": 100.0}


def toy_input(shape=(3, 10, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


def test_padding_tokens_are_ignored():
    model = Toy()
    with torch.no_grad():
        model.down.weight[3, 4] = 4.0
    x = toy_input()
    x[0, 6, 4] = 60.0  # the super-weight token
    x[2, 9, :] = 500.0  # a padding position with far larger values everywhere
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 8:] = 0
    result = find_super_weights(model, {"x": x, "attention_mask": mask}, **LOW)
    assert coordinates(result) == {(0, 3, 4)}
    assert (result.candidates[0].item, result.candidates[0].token) == (0, 6)
    unmasked = find_super_weights(model, x, **LOW)
    stat = unmasked.layer_stats[0]
    assert (stat.item_in, stat.token_in, stat.item_out, stat.token_out) == (2, 9, 2, 9)


def test_low_contribution_is_rejected():
    model = Toy()
    with torch.no_grad():
        model.down.weight[2] = 0.6  # the output spike is made of 16 equal weights
    x = toy_input()
    x[1, 3] = 30.0
    x[1, 3, 4] = 40.0
    result = find_super_weights(model, x, **LOW)
    stat, after = result.layer_stats[0], result.layer_stats[1:]
    assert (stat.channel_in, stat.channel_out, stat.token_in, stat.token_out) == (4, 2, 3, 3)
    assert stat.contribution == pytest.approx(40 * 0.6 / (0.6 * (15 * 30 + 40)), rel=1e-5)
    assert stat.reason.startswith("contribution 0.08 < 0.5") and not result.found
    # The rejected spike's channel is masked for the next round, which finds nothing more.
    assert [a.masked_channels for a in after] == ["2"] and after[0].channel_out != 2
    assert result.stopped == "no spike left"
    assert find_super_weights(model, x, contribution_min=0.05, weight_ratio=3, **LOW).found


def test_the_weight_is_traced_from_the_output_spike_and_min_abs_applies():
    model = Toy()
    with torch.no_grad():
        model.down.weight[:, 4] = 0.0
        model.down.weight[2, 5] = 3.0
    x = toy_input()
    x[0, 1, 4] = 80.0  # the largest input spike, but it reaches no output
    x[1, 3, 5] = 40.0  # smaller input, but it makes the output spike
    (stat,) = find_super_weights(model, x, max_rounds=1, **LOW).layer_stats
    assert (stat.token_in, stat.token_out, stat.row, stat.col) == (1, 3, 2, 5)
    assert stat.decision == "accepted" and stat.input_at_spike == pytest.approx(40.0)
    result = find_super_weights(model, x, min_abs=1e6, **LOW)
    (stat,) = result.layer_stats
    assert "|output| 120 < min_abs 1e+06" in stat.reason and "|input| 40 <" in stat.reason
    assert not result.found
    json.dumps(result.to_json(), allow_nan=False)  # NaN becomes null


def test_two_dimensional_activations_and_several_calls():
    model = Toy()
    with torch.no_grad():
        model.down.weight[6, 11] = 5.0
    chunks = [toy_input((12, 16)) for _ in range(3)]
    chunks[2][7, 11] = 70.0
    result = find_super_weights(model, lambda m: [m(c) for c in chunks], **LOW)
    assert coordinates(result) == {(0, 6, 11)}
    assert (result.candidates[0].item, result.candidates[0].token) == (2, 7)  # call 2, row 7

    batches = [toy_input((2, 5, 16)) for _ in range(3)]
    batches[1][1, 4, 11] = 70.0
    result = find_super_weights(model, lambda m: [m(b) for b in batches], **LOW)
    assert (result.candidates[0].item, result.candidates[0].token) == (3, 4)  # 2 + 1


@pytest.mark.parametrize("spike_call", [5, 100, 149])
def test_many_calls_keep_the_spike_and_the_median(spike_call):
    model = Toy()
    with torch.no_grad():
        model.down.weight[6, 11] = 5.0
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 8, 16, generator=generator) for _ in range(150)]
    batches[spike_call][1, 2, 11] = 70.0
    result = find_super_weights(model, lambda m: [m(b) for b in batches], max_rounds=1, **LOW)
    (cand,) = result.candidates
    assert (cand.item, cand.token) == (2 * spike_call + 1, 2)
    true_median = torch.cat(batches).abs().median().item()
    assert result.layer_stats[0].median_in == pytest.approx(true_median, rel=0.1)


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder: its eval fast path (nested tensors) is kept away from the hooks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=True)

    def forward(self, x, src_key_padding_mask):
        return self.transformer_encoder(x, src_key_padding_mask=src_key_padding_mask)


def test_pytorch_transformer_encoder_with_padding():
    model = TorchEncoder().eval()
    with torch.no_grad():
        model.transformer_encoder.layers[2].linear1.weight[4] *= 200
        model.transformer_encoder.layers[2].linear2.weight[7, 4] = 5.0
    x = toy_input((4, 12, 32))
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[1:, 9:] = True
    result = find_super_weights(model, lambda m: m(x, pad))  # positional mask found too
    assert coordinates(result) == {(2, 7, 4)}
    assert not pad[result.candidates[0].item, result.candidates[0].token]
    assert result.layers_frame()["resid_max"].notna().all()  # norm2 siblings exist


def test_max_rounds_and_thresholds_are_respected():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    once = find_super_weights(model, token_batch(), max_rounds=1)
    assert once.rounds == 1 and once.stopped == "max_rounds reached" and once.found
    strict = find_super_weights(model, token_batch(), output_ratio=1e9)
    assert not strict.found and "output ratio" in strict.strongest(1)["reason"].iloc[0]
    with pytest.raises(UserError):
        find_super_weights(model, token_batch(), max_rounds=0)


def test_pattern_selection():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    by_key = find_super_weights(model, token_batch(), "hf_decoder", max_rounds=1)
    by_regex = find_super_weights(model, token_batch(), r"^model\.layers\.(1)\.mlp\.down_proj$")
    assert coordinates(by_key) == coordinates(by_regex) == {(1, 5, 7)}
    assert {s.layer for s in by_regex.layer_stats} == {1}
    bare = find_super_weights(model.model, token_batch(), max_rounds=1)  # LlamaModel: no "model."
    assert bare.settings["modules"][1] == "layers.1.mlp.down_proj"
    assert coordinates(bare) == {(1, 5, 7)}
    with pytest.raises(UserError, match="built-in patterns"):
        find_super_weights(nn.Sequential(nn.Linear(4, 4)), torch.zeros(1, 4))
    with pytest.raises(UserError, match="matches"):
        find_super_weights(model, token_batch(), r"^nothing\.(\d+)$")


def test_tables_have_every_field():
    result = find_super_weights(Toy(), toy_input(), **LOW)
    frame = result.layers_frame()
    assert list(frame.columns) == [f.name for f in fields(LayerStat)]
    assert list(result.to_frame().columns) == [f.name for f in fields(Candidate)]
    assert frame["resid_max"].isna().all()  # this model has no norm2


def test_layernorm_outliers():
    model = scgpt(pre_norm=False)
    assert layernorm_outliers(model).empty  # fresh LayerNorm gains are all 1
    with torch.no_grad():
        model.transformer_encoder.layers[2].norm2.weight.normal_(1.0, 0.05)
        model.transformer_encoder.layers[2].norm2.weight[17] = 6.0
    table = layernorm_outliers(model, z=10)
    assert list(zip(table["module"], table["channel"], strict=True)) == [
        ("transformer_encoder.layers.2.norm2", 17)
    ]
    assert table["gain"].iloc[0] == 6.0 and table["robust_z"].iloc[0] > 10


def test_collateral_rows_of_a_massive_input_are_not_candidates():
    """A massive input column lights up ordinary weights of its column far above the layer
    median; only the planted weights (standing out in their columns) are candidates."""
    model = llama()
    plant_llama(model, layer=1, row=5, col=7, scale=60.0)
    plant_llama(model, layer=3, row=40, col=30, scale=60.0)
    result = find_super_weights(model, token_batch())
    assert coordinates(result) == {(1, 5, 7), (3, 40, 30)}
    frame = result.layers_frame()
    later = frame[(frame["round"] > 1) & frame["layer"].isin([1, 3])]
    lit = later[later["ratio_out"] >= 100]  # ordinary weights × the surviving input spike
    assert len(lit) and (lit["decision"] == "collateral").all()
    assert set(lit["collateral_of"]) <= {"(1, 5, 7)", "(3, 40, 30)"}
    assert [c.rank for c in result.candidates] == [1, 2]
    assert result.candidates[0].output_ratio >= result.candidates[1].output_ratio


def test_a_large_weight_without_an_input_spike_is_no_candidate():
    model = llama()
    plant_llama(model, layer=1, row=5, col=7)
    with torch.no_grad():  # decoy: the largest weight of layer 2, on an ordinary input column
        model.model.layers[2].mlp.down_proj.weight[11, 13] = 6.0
    assert coordinates(find_super_weights(model, token_batch())) == {(1, 5, 7)}


def test_a_super_weight_is_found_after_typical_inputs_have_grown():
    """Fine-tuning can raise a layer's typical input activations until the super weight's
    input is only ~30x the layer median; a weight that alone makes a spike of 1000x the
    median is still found (the input side confirms the source; it does not veto)."""
    model = Toy()
    with torch.no_grad():
        model.down.weight[3, 4] = 8.0
    x = toy_input() * 3.0  # grown typical inputs
    x[1, 5, 4] = 60.0  # ~30x the median |x|
    result = find_super_weights(model, x, max_rounds=1)
    (cand,) = result.candidates
    assert (cand.row, cand.col) == (3, 4) and 10 <= cand.input_ratio < 100
    assert cand.output_ratio >= 100 and cand.weight_ratio >= 10
    old_rule = find_super_weights(model, x, max_rounds=1, input_ratio=100)
    assert not old_rule.found and "input ratio at the spike" in old_rule.layer_stats[0].reason


def test_sample_rows_are_one_random_row_per_stratum_reproducibly():
    rows = torch.zeros(1000, 64)
    picks, pad = _SampleRows(size=640, seed=3)(rows, None)  # 10 rows of 64 values
    assert pad is None and len(picks) == 10
    assert torch.equal(picks // 100, torch.arange(10))  # one in each stratum of 100 rows
    assert torch.equal(picks, _SampleRows(size=640, seed=3)(rows, None)[0])
    assert not torch.equal(picks, _SampleRows(size=640, seed=4)(rows, None)[0])
    few, _ = _SampleRows(size=640, seed=3)(torch.zeros(7, 64), None)
    assert torch.equal(few, torch.arange(7))  # no more rows than wanted: all of them
