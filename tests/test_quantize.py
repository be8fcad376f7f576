"""Blockwise round-to-nearest quantization, super-weight holdout, W8A8 and the stage."""

import pandas as pd
import pytest
import torch

from superweights.errors import UserError
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.quantize import (
    COLUMNS,
    QuantizeSettings,
    activation_quantization,
    clip_outliers,
    fake_quantize_activation,
    held_out_channels,
    quantizable_weights,
    quantize_dequantize,
    quantize_model,
    quantize_model_int8,
    quantize_symmetric,
    quantize_with_holdout,
    read_super_weights,
    run_quantization,
    weight_error,
    write_outputs,
)
from superweights.quantize_plots import plot_quantization

PAD_ID = 47
DOWN0 = "transformer_encoder.layers.0.linear2"
ROW, COL = 5, 7


def super_table(module=DOWN0, layer=0, row=ROW, col=COL) -> pd.DataFrame:
    return pd.DataFrame({"module": [module], "layer": [layer], "row": [row], "col": [col]})


def planted_model(seed: int, spike: float, weight: float) -> ScGPTModel:
    """Tiny scGPT whose layer-0 down-projection holds a super weight W[ROW, COL] = `weight`
    fed by an input spike: linear1's bias makes channel COL ≈ `spike` on every token."""
    torch.manual_seed(seed)
    config = ScGPTConfig(
        ntoken=50, d_model=32, nhead=4, d_hid=64, nlayers=2, n_cls=4, pad_token_id=PAD_ID
    )
    model = ScGPTModel(config).eval()
    with torch.no_grad():
        model.transformer_encoder.layers[0].linear2.weight[ROW, COL] = weight
        model.transformer_encoder.layers[0].linear1.bias[COL] = spike
    return model


def cells(seed: int, n: int = 64, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "gene_ids": torch.randint(0, PAD_ID, (n, length), generator=g),
        "values": torch.randint(0, 51, (n, length), generator=g).float(),
        "padding_mask": torch.zeros(n, length, dtype=torch.bool),
    }


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(batch["gene_ids"], batch["values"], batch["padding_mask"])["cls_logits"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def no_hooks(model) -> bool:
    return not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# --- tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [64, 100, 1000, "tensor"])
def test_error_is_at_most_half_a_step_of_its_block(bits, block):
    w = torch.randn(37, 29, generator=torch.Generator().manual_seed(bits)) * 3
    q = quantize_dequantize(w, bits, block)
    assert q.shape == w.shape and q.dtype == w.dtype
    size = w.numel() if block == "tensor" else block
    flat_w, flat_q = w.reshape(-1), q.reshape(-1)
    for start in range(0, w.numel(), size):  # 1073 = 37·29 is divisible by none of the sizes
        bw, bq = flat_w[start : start + size], flat_q[start : start + size]
        step = float(bw.max() - bw.min()) / (2**bits - 1)
        assert float((bw - bq).abs().max()) <= step / 2 * (1 + 1e-5)
        assert len(torch.unique(bq)) <= 2**bits
        assert bq.min() == bw.min()


def test_constant_blocks_are_exact_and_block_sizes_beyond_the_tensor_are_one_block():
    w = torch.arange(6.0).repeat_interleave(64).view(12, 32) - 2.5
    assert torch.equal(quantize_dequantize(w, 4, 64), w)
    assert torch.equal(quantize_dequantize(torch.zeros(3, 5), 4, "tensor"), torch.zeros(3, 5))
    r = torch.randn(9, 11, generator=torch.Generator().manual_seed(0))
    whole = quantize_dequantize(r, 4, "tensor")
    assert torch.equal(quantize_dequantize(r, 4, 99), whole)
    assert torch.equal(quantize_dequantize(r, 4, 10_000), whole)
    assert not torch.equal(quantize_dequantize(r, 4, 16), whole)


def test_bad_block_size_and_settings_are_user_errors():
    with pytest.raises(UserError, match="block size"):
        quantize_dequantize(torch.ones(4, 4), 4, 0)
    with pytest.raises(UserError, match="bits"):
        QuantizeSettings(bits=[1])
    with pytest.raises(UserError, match="fraction"):
        QuantizeSettings(clip="fraction", clip_value=2.0)
    with pytest.raises(UserError, match="clip_scope"):
        QuantizeSettings(clip_scope="some")


def test_clipping_by_zscore_and_by_fraction():
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    w[3, 4] = 100.0
    w[10, 11] = -80.0
    clipped = clip_outliers(w, "zscore", 6.0)
    changed = (clipped != w).nonzero().tolist()
    assert changed == [[3, 4], [10, 11]]
    high = float(w.mean() + 6 * w.std())
    assert clipped[3, 4] == pytest.approx(high)
    top = clip_outliers(w, "fraction", 0.01)  # 1% of 2,000 = the 20 largest |w|
    assert int((top != w).sum()) == 20
    assert float(top.abs().max()) == pytest.approx(float(w.abs().flatten().sort()[0][-21]))
    assert torch.equal(clip_outliers(w, "none", 0.0), w)


def test_holdout_without_super_weights_or_clipping_equals_naive():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    w[1, 2] = 50.0
    naive = quantize_dequantize(w, 4, 512)
    assert torch.equal(quantize_with_holdout(w, 4, 512, [], clip="none"), naive)
    model = planted_model(0, spike=8.0, weight=1.5)
    plain = quantize_model(model, 4, 256, holdout=False)
    for held in (
        quantize_model(model, 4, 256, True, None, clip="none", clip_scope="all"),
        quantize_model(model, 4, 256, True, super_table().iloc[:0]),  # clips nothing
    ):
        assert_same_state(held, state(plain))


def test_holdout_restores_the_super_weight_and_keeps_the_rest_fine():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3)) * 0.05
    w[ROW, COL] = 5.0
    naive = quantize_dequantize(w, 4, "tensor")
    held = quantize_with_holdout(w, 4, "tensor", [(ROW, COL)])
    assert held[ROW, COL] == w[ROW, COL]
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[ROW, COL] = False
    # naive: step = (5 + max|w|) / 15 > 0.33, so most ordinary weights collapse to two levels
    assert relative_error(held[rest], w[rest]) < 0.2 * relative_error(naive[rest], w[rest])


def test_symmetric_int8_per_channel_bound():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(4))
    q = quantize_symmetric(w, 8, per_channel=True)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((q - w).abs() <= step / 2 * (1 + 1e-5)).all())
    assert torch.equal(q.abs().amax(dim=1), w.abs().amax(dim=1))
    per_tensor = quantize_symmetric(w, 8, per_channel=False)
    assert float((per_tensor - w).abs().max()) <= float(w.abs().max()) / 127 / 2 * (1 + 1e-5)


# --- models -----------------------------------------------------------------------------


def test_quantizable_weights_cover_the_encoder_and_optionally_the_heads():
    model = planted_model(0, spike=0.0, weight=0.0)
    names = set(quantizable_weights(model))
    per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    per_layer += ["linear1.weight", "linear2.weight"]
    assert names == {f"transformer_encoder.layers.{i}.{n}" for i in (0, 1) for n in per_layer}
    with_heads = set(quantizable_weights(model, include_heads=True)) - names
    assert "cls_decoder.out_layer.weight" in with_heads and "decoder.fc.0.weight" in with_heads
    assert not any("norm" in n for n in with_heads)
    before = state(model)
    q = quantize_model(model, 4, 64, holdout=False)
    assert torch.equal(q.cls_decoder.out_layer.weight, model.cls_decoder.out_layer.weight)
    q = quantize_model(model, 4, 64, holdout=False, include_heads=True)
    assert not torch.equal(q.cls_decoder.out_layer.weight, model.cls_decoder.out_layer.weight)
    assert_same_state(model, before)


def test_super_weight_not_in_model_is_a_user_error():
    model = planted_model(0, spike=0.0, weight=0.0)
    with pytest.raises(UserError, match="another checkpoint"):
        quantize_model(model, 4, 64, True, super_table(row=999))
    with pytest.raises(UserError, match="another checkpoint"):
        quantize_model(model, 4, 64, True, super_table(module="transformer_encoder.nope"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_holdout_loses_clearly_less_than_naive_on_a_planted_super_weight(seed):
    model = planted_model(seed, spike=8.0, weight=1.5)
    batch = cells(seed)
    reference = logits(model, batch)
    pruned = planted_model(seed, spike=8.0, weight=0.0)
    assert relative_error(logits(pruned, batch), reference) > 0.5  # the model relies on it
    before = state(model)
    errors = {}
    for holdout in (False, True):
        q = quantize_model(model, 4, "tensor", holdout, super_table())
        errors[holdout] = relative_error(logits(q, batch), reference)
    assert q.transformer_encoder.layers[0].linear2.weight[ROW, COL] == 1.5
    assert errors[False] > 1.5 * errors[True]
    assert weight_error(model, quantize_model(model, 4, "tensor", False)) > weight_error(
        model, quantize_model(model, 4, "tensor", True, super_table())
    )
    assert_same_state(model, before)


# --- activations ------------------------------------------------------------------------


def test_fake_quantized_activation_holds_out_channels():
    x = torch.rand(3, 5, 16, generator=torch.Generator().manual_seed(5))
    x[..., 7] = 300.0
    naive = fake_quantize_activation(x)
    assert float((naive - x).abs().max()) <= 300.0 / 127 / 2 * (1 + 1e-5)
    held = fake_quantize_activation(x, keep=[7])
    assert torch.equal(held[..., 7], x[..., 7])
    rest = [c for c in range(16) if c != 7]
    step = float(x[..., rest].abs().max()) / 127
    assert float((held[..., rest] - x[..., rest]).abs().max()) <= step / 2 * (1 + 1e-5)
    assert torch.equal(fake_quantize_activation(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_held_out_channels_follow_the_super_weight():
    model = planted_model(0, spike=0.0, weight=0.0)
    layer1 = "transformer_encoder.layers.1"
    assert held_out_channels(model, super_table()) == {
        DOWN0: [COL],
        f"{layer1}.self_attn": [ROW],
        f"{layer1}.linear1": [ROW],
    }
    assert held_out_channels(model, super_table(), hold_out_residual=False) == {DOWN0: [COL]}
    assert held_out_channels(model, None) == {}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w8a8_holdout_beats_naive_and_hooks_are_removed(seed):
    model = planted_model(seed, spike=100.0, weight=1.5)
    batch = cells(seed)
    reference = logits(model, batch)
    before = state(model)
    errors = {}
    for name, keep in (("naive", None), ("holdout", held_out_channels(model, super_table()))):
        with activation_quantization(model, keep):
            errors[name] = relative_error(logits(model, batch), reference)
        assert no_hooks(model)
    assert errors["naive"] > 1.5 * errors["holdout"] > 0
    with pytest.raises(RuntimeError), activation_quantization(model):
        raise RuntimeError
    assert no_hooks(model)
    assert_same_state(model, before)
    q = quantize_model_int8(model)
    assert 0 < weight_error(model, q) < 0.01


# --- the stage --------------------------------------------------------------------------


def test_run_quantization_table_outputs_and_figure(tmp_path):
    model = planted_model(0, spike=8.0, weight=1.5)
    loader = [cells(seed, n=32) for seed in (10, 11)]
    for batch in loader:
        batch["labels"] = logits(model, batch).argmax(1)
    before = state(model)
    settings = QuantizeSettings(bits=[8, 4], block_sizes=[64, "tensor"])
    frame = run_quantization(model, loader, list("abcd"), super_table(), settings)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 1 + 2 * 2 * 2 + 2
    fp32 = frame.iloc[0]
    assert (fp32.scheme, fp32.accuracy, fp32.weight_error) == ("fp32", 1.0, 0.0)
    assert set(frame.n_cells) == {64} and set(frame.n_super_weights) == {1}
    int4 = frame[(frame.bits == 4) & (frame.block_size == "tensor")].set_index("method")
    assert int4.weight_error["naive"] > int4.weight_error["holdout"]
    assert int4.n_clipped["holdout"] >= 1 and int4.n_clipped["naive"] == 0
    assert set(frame[frame.scheme == "w8a8"].method) == {"naive", "holdout"}
    assert_same_state(model, before)
    assert no_hooks(model)

    path = write_outputs(frame, tmp_path / "out")
    assert path.name == "quantize.tsv" and not list(path.parent.glob(".*"))
    back = pd.read_csv(path, sep="\t", dtype={"block_size": str})
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    png = plot_quantization(back, tmp_path / "out" / "quantize.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_super_weights_keeps_confirmed_rows(tmp_path):
    path = tmp_path / "super_weights.tsv"
    table = pd.concat([super_table(), super_table(row=1), super_table(row=2)])
    table.assign(weight=[1.5, 0.1, 0.2], confirmed=[True, False, True]).to_csv(
        path, sep="\t", index=False
    )
    assert read_super_weights(path)["row"].tolist() == [ROW, 2]
    super_table().to_csv(path, sep="\t", index=False)
    with pytest.raises(UserError, match="confirmed"):
        read_super_weights(path)
