"""The scGPT-compatible model: shapes, padding, norm schemes, hooks, dropout, config."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from superweights.errors import UserError
from superweights.model.scgpt import ScGPTConfig, ScGPTModel

ARGS_DIR = Path("/work/shared/reference/scgpt_args")
PAD_ID = 47


def small_config(**changes) -> ScGPTConfig:
    settings = dict(
        ntoken=50, d_model=32, nhead=4, d_hid=24, nlayers=2, n_cls=3, pad_token_id=PAD_ID
    )
    return ScGPTConfig(**{**settings, **changes})


def batch(B=3, L=8, lengths=(8, 5, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(0, PAD_ID, (B, L), generator=g)
    values = torch.randint(0, 51, (B, L), generator=g).float()
    padding = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]
    gene_ids[padding] = PAD_ID
    values[padding] = -2
    return gene_ids, values, padding


def test_output_shapes_and_heads():
    gene_ids, values, padding = batch()
    out = ScGPTModel(small_config(do_mvc=True))(gene_ids, values, padding)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "hidden": (3, 8, 32),
        "cell_emb": (3, 32),
        "expr": (3, 8),
        "cls_logits": (3, 3),
        "mvc": (3, 8),
    }
    torch.testing.assert_close(out["cell_emb"], out["hidden"][:, 0])
    bare = ScGPTModel(small_config(n_cls=0))
    assert set(bare(gene_ids, values, padding)) == {"hidden", "cell_emb", "expr"}
    assert not any(k.startswith(("cls_decoder", "mvc_decoder")) for k in bare.state_dict())


def test_mismatched_input_shapes_are_rejected():
    gene_ids, values, padding = batch()
    with pytest.raises(ValueError, match="same"):
        ScGPTModel(small_config())(gene_ids, values[:, :-1], padding)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_padding_does_not_change_real_positions(pre_norm):
    torch.manual_seed(0)
    model = ScGPTModel(small_config(pre_norm=pre_norm, do_mvc=True)).eval()
    gene_ids, values, _ = batch(B=2, L=6, lengths=(6, 6))
    no_pad = torch.zeros(2, 6, dtype=torch.bool)
    # Append 4 padded positions holding arbitrary genes and values: nothing real may move.
    extra_ids = torch.randint(0, PAD_ID, (2, 4))
    padded = (
        torch.cat([gene_ids, extra_ids], 1),
        torch.cat([values, 100 * torch.rand(2, 4)], 1),
        torch.cat([no_pad, torch.ones(2, 4, dtype=torch.bool)], 1),
    )
    with torch.no_grad():
        ref, out = model(gene_ids, values, no_pad), model(*padded)
    for key in ("hidden", "expr", "mvc"):
        torch.testing.assert_close(out[key][:, :6], ref[key])
    for key in ("cell_emb", "cls_logits"):
        torch.testing.assert_close(out[key], ref[key])


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-LN", "pre-LN"])
def test_layer_matches_pytorch_encoder_layer(pre_norm):
    """A layer equals nn.TransformerEncoderLayer (ReLU, norm_first=pre_norm), with padding."""
    torch.manual_seed(0)
    model = ScGPTModel(small_config(pre_norm=pre_norm, dropout=0.0))
    ours = model.transformer_encoder.layers[0]
    reference = nn.TransformerEncoderLayer(
        32, 4, 24, dropout=0.0, batch_first=True, norm_first=pre_norm
    )
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 8, 32)
    _, _, padding = batch()
    with torch.no_grad():  # train mode: PyTorch's dense (non-fast) path
        expected = reference(x, src_key_padding_mask=padding)
        got = model.transformer_encoder(x, padding)  # layer 0 then layer 1
        got0 = ours(x, ~padding[:, None, None, :])
    torch.testing.assert_close(got0, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, got0)


def test_pre_norm_leaves_residual_stream_unnormalised():
    torch.manual_seed(0)
    gene_ids, values, padding = batch()
    post = ScGPTModel(small_config()).eval()
    pre = ScGPTModel(small_config(pre_norm=True)).eval()
    pre.load_state_dict(post.state_dict())
    with torch.no_grad():
        h_post, h_pre = (
            post(gene_ids, values, padding)["hidden"],
            pre(gene_ids, values, padding)["hidden"],
        )
    # post-LN ends in LayerNorm (unit weight at init): per-token std is 1; pre-LN does not.
    std_post = h_post.std(-1, unbiased=False)
    torch.testing.assert_close(std_post, torch.ones_like(std_post), atol=1e-3, rtol=0)
    assert (h_pre.std(-1, unbiased=False) - 1).abs().max() > 0.05


@pytest.mark.parametrize("train", [False, True], ids=["eval-no_grad", "train"])
def test_linear2_hooks_see_dense_tensors(train):
    model = ScGPTModel(small_config(nlayers=3)).train(train)
    seen = []

    def hook(module, inputs, output):
        seen.append((inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in model.down_projections()]
    gene_ids, values, padding = batch()
    with torch.set_grad_enabled(train):
        model(gene_ids, values, padding)
    for handle in handles:
        handle.remove()
    assert len(seen) == 3
    for x, y in seen:
        assert type(x) is torch.Tensor and not x.is_nested and not y.is_nested
        assert x.shape == (3, 8, 24) and y.shape == (3, 8, 32)
    names = [n for n, m in model.named_modules() if m in model.down_projections()]
    assert names == [f"transformer_encoder.layers.{i}.linear2" for i in range(3)]


def test_train_without_dropout_equals_eval():
    torch.manual_seed(0)
    model = ScGPTModel(small_config(dropout=0.0, do_mvc=True))
    gene_ids, values, padding = batch()
    with torch.no_grad():
        train_out = model.train()(gene_ids, values, padding)
        eval_out = model.eval()(gene_ids, values, padding)
    for key in eval_out:
        torch.testing.assert_close(train_out[key], eval_out[key])


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    model = ScGPTModel(small_config(dropout=0.3))
    gene_ids, values, padding = batch()
    with torch.no_grad():
        a, b = model.train()(gene_ids, values, padding), model(gene_ids, values, padding)
        c, d = model.eval()(gene_ids, values, padding), model(gene_ids, values, padding)
    assert not torch.allclose(a["cell_emb"], b["cell_emb"])
    torch.testing.assert_close(c["cell_emb"], d["cell_emb"])


def test_config_from_released_args():
    args = json.loads((ARGS_DIR / "scGPT_human.args.json").read_text())
    config = ScGPTConfig.from_args(args, ntoken=60697, n_cls=7)
    assert (config.d_model, config.nhead, config.d_hid, config.nlayers) == (512, 8, 512, 12)
    assert (config.nlayers_cls, config.dropout, config.pad_value) == (3, 0.2, -2)
    assert config.pad_token_id == 60694 and config.n_cls == 7
    assert config.do_mvc and not config.pre_norm
    assert ScGPTConfig.from_args(config.to_args(), ntoken=60697, n_cls=7) == config
    brain = json.loads((ARGS_DIR / "scGPT_brain.args.json").read_text())
    assert not ScGPTConfig.from_args(brain, ntoken=60697).do_mvc


def test_pre_norm_round_trips_through_args():
    config = small_config(pre_norm=True)
    args = config.to_args()
    assert args["norm_scheme"] == "pre"
    assert ScGPTConfig.from_args(args, config.ntoken, 3, pad_token_id=PAD_ID) == config


@pytest.mark.parametrize(
    "change",
    [
        {"input_emb_style": "category"},
        {"cell_emb_style": "avg-pool"},
        {"mvc_decoder_style": "concat query"},
        {"DSBN": True},
        {"use_batch_labels": True},
        {"fast_transformer_backend": "linear"},
        {"pre_norm": True},  # with fast_transformer: scGPT's flash pre-norm variant
        {"norm_scheme": "sandwich"},
        {"embsize": 500},  # not divisible by 8 heads
    ],
)
def test_unsupported_architecture_is_a_user_error(change):
    args = json.loads((ARGS_DIR / "scGPT_human.args.json").read_text())
    with pytest.raises(UserError):
        ScGPTConfig.from_args({**args, **change}, ntoken=60697)


def test_pad_token_outside_vocabulary_is_a_user_error():
    with pytest.raises(UserError, match="pad token"):
        ScGPTConfig(ntoken=200)
