"""Blockwise round-to-nearest quantization in three arms, W8A8 with the super activation held
out, the fp32 reference and the stage's table."""

import numpy as np
import pandas as pd
import pytest
import torch

from superweights.errors import UserError
from superweights.model.scgpt import Packing, ScGPTConfig, ScGPTModel
from superweights.quantize import (
    QuantizeSettings,
    activation_quantization,
    clip_outliers,
    control_coords,
    fake_quantize_activation,
    int8_quantizer,
    measure,
    quantizable_weights,
    quantize_dequantize,
    quantize_symmetric,
    quantize_weight,
    quantized_weights,
    read_super_weights,
    rtn_quantizer,
    run_quantization,
    super_activation_sites,
    super_weight_coords,
    write_outputs,
)
from superweights.quantize_plots import write_figures
from superweights.quantize_table import COLUMNS, compare_arms

PAD_ID, CLS_ID = 47, 46
DOWN0 = "transformer_encoder.layers.0.linear2"
ROW, COL, DEAD = 5, 7, 9
CLASSES = list("abcd")


def super_table(module=DOWN0, layer=0, row=ROW, col=COL) -> pd.DataFrame:
    return pd.DataFrame({"module": [module], "layer": [layer], "row": [row], "col": [col]})


def cells(seed: int, n: int = 64, length: int = 12) -> dict:
    """Random cells with `<cls>` (value 0) first, as scGPT sees them."""
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(0, CLS_ID, (n, length), generator=g)
    values = torch.randint(1, 51, (n, length), generator=g).float()
    gene_ids[:, 0], values[:, 0] = CLS_ID, 0.0
    return {
        "gene_ids": gene_ids,
        "values": values,
        "padding_mask": torch.zeros(n, length, dtype=torch.bool),
    }


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(batch["gene_ids"], batch["values"], batch["padding_mask"])["cls_logits"]


def inputs_of(model, module_name: str, batch) -> torch.Tensor:
    """The input of a module on `batch`, as the module receives it (after earlier hooks)."""
    seen = {}
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        logits(model, batch)
    finally:
        handle.remove()
    return seen["x"]


@torch.no_grad()
def planted_model(seed: int, super_weight: float, gain: float, cut: float) -> ScGPTModel:
    """Tiny post-LN scGPT (2 layers, width 64) with a planted super weight.

    Layer 0's MLP unit COL fires only on `<cls>`: its up-projection row is `gain` times the
    sign pattern of the mean `<cls>` state entering the MLP, its bias `-cut`. The
    down-projection weight W[ROW, COL] = `super_weight` turns that input spike into the
    output spike. Every MLP matrix also holds one inert outlier (3.6, ~30x the initial
    weight bound) on hidden unit DEAD, which never fires: harmless in full precision, but it
    stretches the min/max range of a large quantization block, as Llama's outliers do.
    """
    torch.manual_seed(seed)
    config = ScGPTConfig(
        ntoken=50, d_model=64, nhead=4, d_hid=128, nlayers=2, n_cls=4,
        pad_token_id=PAD_ID, dropout=0.0,
    )  # fmt: skip
    model = ScGPTModel(config).eval()
    for layer in model.transformer_encoder.layers:
        layer.linear1.bias[DEAD] = -1e3
        layer.linear1.weight[DEAD, 0] = 3.6
        layer.linear2.weight[0, DEAD] = 3.6
    layer0 = model.transformer_encoder.layers[0]
    cls_state = inputs_of(model, "transformer_encoder.layers.0.linear1", cells(1000 + seed))[:, 0]
    layer0.linear1.weight[COL] = gain * torch.sign(cls_state.mean(0))
    layer0.linear1.bias[COL] = -cut
    layer0.linear2.weight[ROW, COL] = super_weight
    return model


def weight_model(seed: int, super_weight: float = 2.0) -> ScGPTModel:
    """Planted model for the weight arms: input spike ~1.5, no outlier beyond the planted."""
    return planted_model(seed, super_weight, gain=0.125, cut=5.0)


def activation_model(seed: int) -> ScGPTModel:
    """Planted model for W8A8: input spike ~25 on `<cls>`, other tokens ~0 in COL."""
    return planted_model(seed, 2.0, gain=1.0, cut=28.0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def no_hooks(model) -> bool:
    return not any(
        m._forward_pre_hooks or m._forward_hooks or m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


def labelled(model, seeds=(10, 11), n=32) -> list[dict]:
    """Batches labelled with the unquantized model's own predictions (fp32 accuracy 1)."""
    loader = [cells(seed, n=n) for seed in seeds]
    for batch in loader:
        batch["labels"] = logits(model, batch).argmax(1)
    return loader


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


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(bits=[1]), "bits"),
        (dict(bits=[]), "bits"),
        (dict(block_sizes=[]), "block_sizes is empty"),
        (dict(block_sizes=[0]), "block size"),
        (dict(clip_values=[]), "clip_values is empty"),
        (dict(clip="fraction", clip_values=[0.01, 2.0]), "fraction"),
        (dict(clip_values=[-1.0]), "zscore"),
        (dict(clip="none"), "clip must be one of"),
        (dict(clip_scope="some"), "clip_scope"),
        (dict(w8a8_weights="row"), "w8a8_weights"),
        (dict(activation_scale="channel"), "activation_scale"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_settings_are_user_errors(settings, message):
    with pytest.raises(UserError, match=message):
        QuantizeSettings(**settings)


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


def test_the_three_arms_on_one_tensor():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3)) * 0.05
    w[ROW, COL] = 5.0
    w[0, 1] = -3.0  # a second outlier, clipped but never restored
    naive, n_naive = quantize_weight(w, 4, "tensor", "naive", [(ROW, COL)])
    clip, n_clip = quantize_weight(w, 4, "tensor", "clip", [(ROW, COL)])
    restored, n_restored = quantize_weight(w, 4, "tensor", "clip_restore", [(ROW, COL)])
    assert torch.equal(naive, quantize_dequantize(w, 4, "tensor")) and n_naive == 0
    assert n_clip == n_restored == 2
    assert torch.equal(clip, quantize_dequantize(clip_outliers(w), 4, "tensor"))
    assert restored[ROW, COL] == 5.0 and clip[ROW, COL] < 1.0 and restored[0, 1] > -1.0
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[ROW, COL] = False
    assert torch.equal(restored[rest], clip[rest])
    # naive: step = 8/15, so the ordinary weights (|w| ~ 0.05) collapse onto two levels
    ordinary = w.abs() < 0.2
    assert len(torch.unique(naive[ordinary])) == 2
    clipped_error = relative_error(clip[ordinary], w[ordinary])
    assert clipped_error < 0.3 * relative_error(naive[ordinary], w[ordinary])
    with pytest.raises(UserError, match="arm"):
        quantize_weight(w, 4, 64, "restore")


def test_symmetric_int8_per_channel_bound():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(4))
    q = quantize_symmetric(w, 8, per_channel=True)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((q - w).abs() <= step / 2 * (1 + 1e-5)).all())
    assert torch.equal(q.abs().amax(dim=1), w.abs().amax(dim=1))
    per_tensor = quantize_symmetric(w, 8, per_channel=False)
    assert float((per_tensor - w).abs().max()) <= float(w.abs().max()) / 127 / 2 * (1 + 1e-5)


def on_grid(values: torch.Tensor, step) -> bool:
    return bool(torch.allclose(values / step, torch.round(values / step), atol=1e-3))


def test_activation_scale_per_tensor_per_token_real_tokens_and_held_out_elements():
    x = torch.rand(3, 5, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x[1, 2, 7] = 300.0
    x[2, 4] = 1000.0  # a padding token
    real = torch.ones(3, 5, dtype=torch.bool)
    real[2, 4] = False
    naive = fake_quantize_activation(x, real=real)
    assert on_grid(naive, 300.0 / 127) and float(naive[0].abs().max()) < 2.4  # all rounded
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[1, 2, 7] = True
    held = fake_quantize_activation(x, real=real, keep=keep)
    step = float(x[real].masked_fill(keep[real], 0).abs().max()) / 127
    assert held[1, 2, 7] == 300.0 and on_grid(held[real & ~keep.any(-1)], step)
    assert float((held[0] - x[0]).abs().max()) <= step / 2 * (1 + 1e-5)
    per_token = fake_quantize_activation(x, per_token=True, real=real)
    for cell, token in [(0, 0), (1, 2), (2, 3)]:
        token_step = float(x[cell, token].abs().max()) / 127
        assert float((per_token[cell, token] - x[cell, token]).abs().max()) <= token_step / 2 + 1e-6
    assert torch.equal(fake_quantize_activation(torch.zeros(2, 3)), torch.zeros(2, 3))


# --- models: weights --------------------------------------------------------------------


def test_quantizable_weights_cover_the_encoder_and_optionally_the_heads():
    model = weight_model(0)
    names = set(quantizable_weights(model))
    per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    per_layer += ["linear1.weight", "linear2.weight"]
    assert names == {f"transformer_encoder.layers.{i}.{n}" for i in (0, 1) for n in per_layer}
    with_heads = set(quantizable_weights(model, include_heads=True)) - names
    assert "cls_decoder.out_layer.weight" in with_heads and "decoder.fc.0.weight" in with_heads
    assert not any("norm" in n for n in with_heads)
    head = model.cls_decoder.out_layer.weight.detach().clone()
    with quantized_weights(model, rtn_quantizer(4, 64, "naive")):
        assert torch.equal(model.cls_decoder.out_layer.weight, head)
    with quantized_weights(model, rtn_quantizer(4, 64, "naive"), include_heads=True):
        assert not torch.equal(model.cls_decoder.out_layer.weight, head)


def test_quantized_weights_restores_every_weight_bit_for_bit_even_on_error():
    model = weight_model(0)
    before = state(model)
    with quantized_weights(model, rtn_quantizer(3, "tensor", "naive")) as change:
        assert not torch.equal(
            model.transformer_encoder.layers[0].linear2.weight, before[f"{DOWN0}.weight"]
        )
        pairs = [
            (w, quantize_dequantize(w, 3)) for w in map(before.get, quantizable_weights(model))
        ]
        diff = sum(float((w - q).square().sum()) for w, q in pairs)
        total = sum(float(w.square().sum()) for w, _ in pairs)
        assert change.weight_error == pytest.approx((diff / total) ** 0.5)
        assert change.n_clipped == 0
    assert_same_state(model, before)
    with pytest.raises(RuntimeError), quantized_weights(model, int8_quantizer()):
        raise RuntimeError
    assert_same_state(model, before)


def test_clip_scope_all_clips_every_tensor_and_super_only_the_super_weights_tensor():
    model = weight_model(0)
    coords = super_weight_coords(model, super_table())
    layer1_down = "transformer_encoder.layers.1.linear2.weight"
    w = quantizable_weights(model)[layer1_down].detach().clone()
    for scope, expected in (("all", "clip"), ("super", "naive")):
        with quantized_weights(model, rtn_quantizer(4, 64, "clip", coords, clip_scope=scope)):
            got = quantizable_weights(model)[layer1_down]
            assert torch.equal(got, quantize_weight(w, 4, 64, expected)[0]), scope


def test_super_weight_not_in_model_is_a_user_error():
    model = weight_model(0)
    with pytest.raises(UserError, match="another checkpoint"):
        super_weight_coords(model, super_table(row=999))
    with pytest.raises(UserError, match="another checkpoint"):
        super_activation_sites(model, super_table(module="transformer_encoder.nope"))


@pytest.mark.parametrize("seed", range(6))
def test_planted_super_weight_naive_breaks_clip_partly_recovers_restore_recovers_most(seed):
    model = weight_model(seed)
    batch = cells(seed)
    reference = logits(model, batch)
    pruned = weight_model(seed, super_weight=0.0)
    assert relative_error(logits(pruned, batch), reference) > 0.2  # the model relies on it
    coords = super_weight_coords(model, super_table())

    def error(block, arm):
        with quantized_weights(model, rtn_quantizer(4, block, arm, coords, "zscore", 6.0)):
            return relative_error(logits(model, batch), reference)

    small = {arm: error(64, arm) for arm in ("naive", "clip", "clip_restore")}
    large = {arm: error("tensor", arm) for arm in ("naive", "clip", "clip_restore")}
    assert large["naive"] > 0.75 and large["naive"] > 4 * small["naive"]  # breaks
    assert large["naive"] > 1.5 * large["clip"]  # clipping the outliers partly recovers
    assert large["clip"] > 1.5 * large["clip_restore"]  # restoring the super weight: most
    assert large["clip_restore"] < 0.3 * large["naive"]
    assert small["clip_restore"] < small["clip"]  # clipping alone loses the super weight
    assert model.transformer_encoder.layers[0].linear2.weight[ROW, COL] == 2.0


def test_control_arm_restores_the_largest_other_weight_of_the_same_matrix():
    model = weight_model(0)
    coords = super_weight_coords(model, super_table())
    control = control_coords(model, coords)
    name = f"{DOWN0}.weight"
    weight = dict(model.named_parameters())[name].detach().abs()
    ((row, col),) = control[name]
    assert (row, col) != (ROW, COL) and weight[row, col] == 3.6  # the inert outlier
    assert list(control) == [name]


def measure_clipped(model, batches, block, arm, value) -> float:
    coords = super_weight_coords(model, super_table())
    with quantized_weights(model, rtn_quantizer(4, block, arm, coords, "zscore", value)):
        return measure(model, batches, CLASSES)["mean_log_likelihood"]


# --- models: activations ----------------------------------------------------------------


def test_super_activation_sites_follow_the_super_weight():
    model = activation_model(0)
    layer1 = "transformer_encoder.layers.1"
    sites = super_activation_sites(model, super_table())
    assert {name: [(h.channel, h.locate) for h in held] for name, held in sites.items()} == {
        DOWN0: [(COL, True)],
        f"{layer1}.self_attn": [(ROW, False)],
        f"{layer1}.linear1": [(ROW, False)],
    }
    assert set(super_activation_sites(model, super_table(), hold_out_residual=False)) == {DOWN0}
    assert super_activation_sites(model, None) == {}


@pytest.mark.parametrize("per_token", [False, True])
def test_w8a8_holds_out_only_the_super_activation_element(per_token):
    model = activation_model(0)
    batch = cells(0)
    original = inputs_of(model, DOWN0, batch)
    assert bool((original[..., COL].abs().argmax(dim=1) == 0).all())  # spike on <cls>
    assert float(original[:, 1:, COL].abs().max()) < 0.1 * float(original[:, 0, COL].min())
    modules = dict(model.named_modules())
    kept = {DOWN0: COL, "transformer_encoder.layers.1.linear1": ROW}
    kept["transformer_encoder.layers.1.self_attn"] = ROW
    seen = {name: {} for name in kept}

    def capture(name, when):
        return lambda module, args: seen[name].update({when: args[0].detach().clone()})

    handles = [modules[n].register_forward_pre_hook(capture(n, "in")) for n in kept]
    sites = super_activation_sites(model, super_table())
    with activation_quantization(model, sites, 8, per_token):
        handles += [modules[n].register_forward_pre_hook(capture(n, "out")) for n in kept]
        logits(model, batch)
    for handle in handles:
        handle.remove()
    for name, channel in kept.items():
        before, after = seen[name]["in"], seen[name]["out"]
        assert torch.equal(after[:, 0, channel], before[:, 0, channel]), name  # kept exactly
        rest_before, rest_after = before.clone(), after.clone()
        rest_before[:, 0, channel] = rest_after[:, 0, channel] = 0
        absmax = (
            rest_before.abs().amax(dim=-1, keepdim=True) if per_token else rest_before.abs().amax()
        )
        assert on_grid(rest_after, absmax / 127), name  # all else INT8 on a scale without it
        assert float((rest_after - rest_before).abs().max()) > 0, name
    assert no_hooks(model)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token", [False, True])
def test_w8a8_holdout_beats_naive_and_leaves_the_model_as_it_was(seed, per_token):
    model = activation_model(seed)
    batch = cells(seed)
    reference = logits(model, batch)
    before = state(model)
    errors = {}
    for name, sites in (("naive", {}), ("holdout", super_activation_sites(model, super_table()))):
        with activation_quantization(model, sites, 8, per_token):
            errors[name] = relative_error(logits(model, batch), reference)
        assert no_hooks(model)
    assert errors["naive"] > 1.5 * errors["holdout"] > 0
    with pytest.raises(RuntimeError), activation_quantization(model):
        raise RuntimeError
    assert no_hooks(model)
    assert_same_state(model, before)


def test_padding_does_not_enter_the_activation_scale_or_the_spike_search():
    model = activation_model(1)
    real = cells(3, n=16, length=10)
    padded = {k: torch.cat([v, v[:, [0, 0, 0]]], dim=1) for k, v in real.items()}
    padded["padding_mask"][:, -3:] = True  # padding positions that look like <cls>: they spike
    assert float(inputs_of(model, DOWN0, padded)[:, -3:, COL].min()) > 10
    sites = super_activation_sites(model, super_table())
    for per_token in (False, True):
        with activation_quantization(model, sites, 8, per_token):
            same = logits(model, real), logits(model, padded)
        assert torch.allclose(*same, atol=1e-4), per_token


def test_activation_quantization_refuses_packed_batches():
    model = activation_model(0)
    batch = cells(0, n=4)
    packing = Packing.from_padding(batch["padding_mask"])
    with activation_quantization(model), pytest.raises(ValueError, match="padded batches"):
        model(batch["gene_ids"], batch["values"], batch["padding_mask"], packing=packing)
    assert no_hooks(model)


# --- evaluation and the stage -----------------------------------------------------------


def test_measure_is_true_fp32_even_inside_autocast():
    model = weight_model(0)
    loader = labelled(model)
    plain = measure(model, loader, CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert logits(model, loader[0]).dtype == torch.bfloat16  # autocast is active here
        inside = measure(model, loader, CLASSES)
    assert inside == plain and plain["accuracy"] == 1.0 and plain["n_cells"] == 64
    with pytest.raises(UserError, match="fp32"):
        measure(weight_model(0).to(torch.bfloat16), loader, CLASSES)


def test_run_quantization_table_arms_and_outputs(tmp_path, caplog):
    model = weight_model(0)
    loader = labelled(model)
    before = state(model)
    settings = QuantizeSettings(bits=[4], block_sizes=[64, 100_000, "tensor"], clip_values=[3, 6])
    selection = labelled(model, seeds=(20, 21))
    donors = np.repeat(["d1", "d2", "d3", "d4"], 16)
    with caplog.at_level("INFO", logger="superweights.quantize"):
        result = run_quantization(
            model, loader, CLASSES, super_table(), settings, selection_batches=selection,
            donors=donors,
        )  # fmt: skip
    frame = result.table
    assert "24 settings, 17 evaluated" in caplog.text  # 100,000 weights = one block per matrix
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 1 + 3 * (1 + 3 * 2) + 2
    fp32 = frame.iloc[0]
    assert (fp32.scheme, fp32.accuracy, fp32.weight_error) == ("fp32", 1.0, 0.0)
    assert fp32.mean_log_likelihood == pytest.approx(
        measure(model, loader, CLASSES)["mean_log_likelihood"]
    )
    assert set(frame.n_cells) == {64} and set(frame.n_super_weights) == {1}
    weight = frame[frame.scheme == "weight"]
    assert set(weight.method) == {"naive", "clip", "clip_restore", "clip_control"}
    clipped = weight[weight.method != "naive"]
    assert clipped.selection_log_likelihood.notna().all()
    assert weight[weight.method == "naive"].selection_log_likelihood.isna().all()
    assert clipped.loc[clipped.method == "clip", "selection_log_likelihood"].iloc[0] == (
        pytest.approx(measure_clipped(model, selection, 64, "clip", 3))
    )
    assert weight[weight.method == "naive"].clip_value.isna().all()
    assert set(weight[weight.method != "naive"].clip_value) == {3, 6}
    measures = ["accuracy", "mean_log_likelihood", "weight_error", "n_clipped"]
    big, whole = (
        weight[weight.block_size == b].reset_index(drop=True) for b in ("100000", "tensor")
    )
    pd.testing.assert_frame_equal(big[measures], whole[measures])  # evaluated once
    tensor = whole.set_index(["method", "clip_value"], drop=False)
    assert (
        tensor.loc[("clip_restore", 6)].mean_log_likelihood
        > tensor.loc[("naive", np.nan)].mean_log_likelihood
    )
    assert tensor.loc[("clip", 6)].n_clipped >= 5  # the super weight and the inert outliers
    w8a8 = frame[frame.scheme == "w8a8"].set_index("method")
    assert set(w8a8.activation_scale) == {"tensor"} and set(w8a8.block_size) == {"channel"}
    assert 0 < w8a8.weight_error["naive"] == w8a8.weight_error["holdout"] < 0.02
    assert_same_state(model, before)
    assert no_hooks(model)

    arms = compare_arms(frame)
    assert list(arms.block_size) == ["64", "100000", "tensor"]
    best = weight[(weight.block_size == "tensor") & (weight.method == "clip")]
    best = best.loc[best.selection_log_likelihood.idxmax()]  # chosen on the other cells
    assert arms.iloc[2].accuracy_clip == best.accuracy
    assert arms.iloc[2].clip_value_clip == best.clip_value

    contrasts = result.contrasts.set_index(["block_size", "contrast", "measure"])
    gain = contrasts.loc[("tensor", "restore vs clip", "mean_log_likelihood")]
    restore = weight[(weight.block_size == "tensor") & (weight.method == "clip_restore")]
    restore = restore.loc[restore.selection_log_likelihood.idxmax()]
    assert gain.clip_value == restore.clip_value  # each arm at its own chosen threshold
    # The mean of the paired per-cell differences is the difference of the arms' means.
    assert gain.difference == pytest.approx(restore.mean_log_likelihood - best.mean_log_likelihood)
    assert gain.ci_low <= gain.difference <= gain.ci_high and gain.n_donors == 4
    assert gain.ci_low > 0  # restoring the planted super weight helps at one block per matrix
    assert set(result.contrasts.contrast) == {
        "restore vs clip", "restore vs control", "restore vs naive", "holdout vs naive",
    }  # fmt: skip

    named = {"table": tmp_path / "named" / "q.tsv", "figure": tmp_path / "named" / "q.png",
             "contrasts": tmp_path / "named" / "c.tsv"}  # fmt: skip
    assert write_outputs(result, named) == named["table"] and named["contrasts"].is_file()
    assert write_figures(frame, named) == named["figure"]
    path = write_outputs(result, tmp_path / "out")
    assert path == tmp_path / "out" / "quantize.tsv" and not list(path.parent.glob(".*"))
    back = pd.read_csv(path, sep="\t", dtype={"block_size": str})
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    png = write_figures(back, tmp_path / "out")
    assert png.name == "quantize.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert named["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_super_weights_restore_equals_clip_and_holdout_equals_naive(caplog):
    model = weight_model(0)
    loader = labelled(model)
    settings = QuantizeSettings(bits=[4], block_sizes=["tensor"], clip_values=[6, 100])
    with caplog.at_level("INFO", logger="superweights.quantize"):
        frame = run_quantization(model, loader, CLASSES, super_table().iloc[:0], settings).table
    assert "10 settings, 4 evaluated" in caplog.text  # z = 100 clips nothing: naive again
    assert "chosen on the evaluated cells" in caplog.text  # no selection cells given
    measures = ["accuracy", "mean_log_likelihood", "weight_error", "n_clipped"]

    def values(scheme, method):
        return frame.loc[(frame.scheme == scheme) & (frame.method == method), measures]

    assert np.array_equal(values("weight", "clip"), values("weight", "clip_restore"))
    assert np.array_equal(values("weight", "clip"), values("weight", "clip_control"))
    assert np.array_equal(values("w8a8", "naive"), values("w8a8", "holdout"))
    clips = frame[frame.method == "clip"].set_index("clip_value")
    assert clips.n_clipped[100] == 0 and clips.n_clipped[6] > 0
    assert set(frame.n_super_weights) == {0}


def test_read_super_weights_keeps_the_super_weight_tier(tmp_path):
    path = tmp_path / "super_weights.tsv"
    table = pd.concat([super_table(), super_table(row=1), super_table(row=2)])
    table = table.assign(weight=[1.5, 0.1, 0.2], confirmed=[True, False, True])
    table.to_csv(path, sep="\t", index=False)
    assert read_super_weights(path)["row"].tolist() == [ROW, 2]  # no tiers: confirmed rows
    tiers = ["super weight", "not confirmed", "important weight"]
    table.assign(tier=tiers).to_csv(path, sep="\t", index=False)
    assert read_super_weights(path)["row"].tolist() == [ROW]  # an important weight stays in
    super_table().to_csv(path, sep="\t", index=False)
    with pytest.raises(UserError, match="confirmed"):
        read_super_weights(path)
