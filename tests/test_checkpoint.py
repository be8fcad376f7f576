"""Checkpoint folders: released (flash-attention names) and our own, and every refusal."""

import json
import logging

import pytest
import torch

from helpers import (
    CHECKPOINT_VOCAB,
    HUMAN_ARGS,
    flash_names,
    random_model,
    released_args,
    write_folder,
)
from superweights.errors import UserError
from superweights.model import checkpoint
from superweights.model.args import CellCut, cell_cut
from superweights.model.checkpoint import load_checkpoint, save_checkpoint
from superweights.model.scgpt import ScGPTModel

LOGGER = "superweights.model.checkpoint"


def inputs():
    g = torch.Generator().manual_seed(3)
    gene_ids = torch.randint(0, 197, (3, 10), generator=g)
    gene_ids[:, 0] = CHECKPOINT_VOCAB["<cls>"]
    values = torch.randint(1, 51, (3, 10), generator=g).float()
    padding = torch.arange(10)[None, :] >= torch.tensor([10, 7, 4])[:, None]
    gene_ids[padding], values[padding] = CHECKPOINT_VOCAB["<pad>"], -2
    return gene_ids, values, padding


def assert_same_outputs(a: ScGPTModel, b: ScGPTModel):
    with torch.no_grad():
        out_a, out_b = a.eval()(*inputs()), b.eval()(*inputs())
    assert out_a.keys() == out_b.keys()
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key


@pytest.fixture(scope="module")
def source():
    """A random model with the released architecture (MVC on, no classifier)."""
    return random_model(released_args())


@pytest.mark.parametrize("attn_prefix", ["self_attn.", "self_attn._impl."])
def test_released_checkpoint_loads_identically(tmp_path, source, attn_prefix, caplog):
    state = flash_names(source.state_dict(), attn_prefix)
    assert sum(".Wqkv." in k for k in state) == 4
    folder = write_folder(tmp_path / "scGPT_human", released_args(), state)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model, config, vocab = load_checkpoint(folder)
    assert config.pad_token_id == 197 and config.do_mvc and config.n_cls == 0
    assert vocab == CHECKPOINT_VOCAB and not model.training
    assert_same_outputs(model, source)
    assert "renamed 4 flash-attention keys" in caplog.text
    assert f"loaded {len(state)} of {len(state)} model tensors" in caplog.text


def test_classifier_from_pretrained_needs_allow_missing(tmp_path, source, caplog):
    folder = write_folder(tmp_path / "ckpt", released_args(), flash_names(source.state_dict()))
    with pytest.raises(UserError, match=r"10 missing \(cls_decoder"):
        load_checkpoint(folder, n_cls=4)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model, config, _ = load_checkpoint(folder, n_cls=4, allow_missing=["cls_decoder.*"])
    assert config.n_cls == 4
    assert "left 10 tensors at fresh initialisation" in caplog.text
    with torch.no_grad():
        out, ref = model(*inputs()), source(*inputs())
    assert torch.equal(out["cell_emb"], ref["cell_emb"]) and out["cls_logits"].shape == (3, 4)


def test_classifier_head_with_other_class_count(tmp_path):
    """A head saved for 1 class: ignored without a classifier, re-initialised only if allowed."""
    trained = random_model(released_args(), n_cls=1)
    folder = write_folder(tmp_path / "ckpt", released_args(), flash_names(trained.state_dict()))
    model, _, _ = load_checkpoint(folder)
    assert not hasattr(model, "cls_decoder")
    with pytest.raises(UserError, match=r"wrong shape \(cls_decoder.out_layer.weight \(1, 512\)"):
        load_checkpoint(folder, n_cls=4)
    model, _, _ = load_checkpoint(folder, n_cls=4, allow_missing=["cls_decoder.out_layer.*"])
    hidden = model.cls_decoder._decoder[0].weight
    assert torch.equal(hidden, trained.cls_decoder._decoder[0].weight)


def test_unused_head_in_file_is_ignored_and_logged(tmp_path, source, caplog):
    args = released_args(MVC=False)
    folder = write_folder(tmp_path / "ckpt", args, flash_names(source.state_dict()))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model, config, _ = load_checkpoint(folder)
    assert not config.do_mvc and not hasattr(model, "mvc_decoder")
    assert (
        f"ignored 3 tensor(s) of mvc_decoder.* in {folder}: MVC head, off in args.json"
        " (MVC: false) (mvc_decoder.gene2query.weight, mvc_decoder.gene2query.bias, "
        "mvc_decoder.W.weight)"
    ) in caplog.text


def test_save_round_trip_safetensors_and_pt(tmp_path):
    trained = random_model(released_args(), n_cls=4, seed=1)
    folder = tmp_path / "out" / "finetuned"
    config = trained.config
    save_checkpoint(
        trained, config, CHECKPOINT_VOCAB, folder, extra_args={"n_bins": 51, "MVC": False}
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "args.json",
        "best_model.pt",
        "model.safetensors",
        "vocab.json",
    ]
    args = json.loads((folder / "args.json").read_text())
    assert args["n_cls"] == 4 and args["n_bins"] == 51 and args["MVC"] is True
    model, loaded_config, vocab = load_checkpoint(folder)
    assert loaded_config == config and vocab == CHECKPOINT_VOCAB
    assert_same_outputs(model, trained)
    (folder / "model.safetensors").unlink()
    model, _, _ = load_checkpoint(folder)
    assert_same_outputs(model, trained)


def test_cells_are_cut_as_args_json_records(tmp_path, caplog):
    """A released args.json has scGPT's max_seq_len and no seed; one with neither gets
    `CellCut()` (1,200 and seed 0, logged as defaults); ours records both."""
    caplog.set_level(logging.INFO, logger="superweights.model.args")
    for name in ("scGPT_human", "scGPT_brain"):
        args = json.loads(HUMAN_ARGS.with_name(f"{name}.args.json").read_text())
        released = write_folder(tmp_path / name, args, {})
        assert cell_cut(released) == CellCut(args["max_seq_len"], 0) == CellCut(1200, 0)
    assert "subsample_seed not in" in caplog.text
    bare = write_folder(tmp_path / "bare", {"embsize": 512}, {})
    assert cell_cut(bare) == CellCut() == CellCut(max_seq_len=1200, seed=0)
    assert "max_seq_len, subsample_seed not in" in caplog.text
    model = random_model(released_args())
    ours = save_checkpoint(model, model.config, CHECKPOINT_VOCAB, tmp_path / "ours",
                           extra_args=CellCut(64, 5).to_args())  # fmt: skip
    assert cell_cut(ours) == CellCut(64, 5) and "as trained" in caplog.text


def test_save_replaces_existing_folder_only_when_complete(tmp_path, monkeypatch):
    first, second = random_model(released_args(), seed=1), random_model(released_args(), seed=2)
    folder = tmp_path / "ckpt"
    save_checkpoint(first, first.config, CHECKPOINT_VOCAB, folder)

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(second, second.config, CHECKPOINT_VOCAB, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    assert_same_outputs(load_checkpoint(folder)[0], first)

    monkeypatch.undo()
    save_checkpoint(second, second.config, CHECKPOINT_VOCAB, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_same_outputs(load_checkpoint(folder)[0], second)


@pytest.mark.parametrize("name", ["args.json", "vocab.json", "best_model.pt"])
def test_missing_file_is_a_user_error(tmp_path, source, name):
    folder = write_folder(tmp_path / "ckpt", released_args(), flash_names(source.state_dict()))
    (folder / name).unlink()
    with pytest.raises(UserError, match="lacks|neither"):
        load_checkpoint(folder)


def test_missing_folder_and_corrupt_weights_are_user_errors(tmp_path, source):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    folder = write_folder(tmp_path / "ckpt", released_args(), {})
    (folder / "best_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights") as refused:
        load_checkpoint(folder)
    assert "neither a PyTorch checkpoint nor a pickle" in str(refused.value)
    assert "weights_only" not in str(refused.value)


def test_unknown_architecture_value_is_a_user_error(tmp_path, source):
    args = released_args(input_emb_style="category")
    folder = write_folder(tmp_path / "ckpt", args, flash_names(source.state_dict()))
    with pytest.raises(UserError, match="input_emb_style='category'"):
        load_checkpoint(folder)


def test_wrong_shape_is_a_user_error(tmp_path, source):
    folder = write_folder(
        tmp_path / "ckpt", released_args(d_hid=256), flash_names(source.state_dict())
    )
    with pytest.raises(UserError, match=r"6 with the wrong shape \(transformer_encoder"):
        load_checkpoint(folder)


def test_vocabulary_not_matching_embedding_is_a_user_error(tmp_path, source):
    vocab = {**{f"GENE{i}": i for i in range(198)}, "<pad>": 198, "<cls>": 199, "<eoc>": 200}
    state = flash_names(source.state_dict())
    folder = write_folder(tmp_path / "ckpt", released_args(), state, vocab)
    with pytest.raises(UserError, match=r"encoder.embedding.weight \(200, 512\)!=\(201, 512\)"):
        load_checkpoint(folder)


def test_unexpected_key_is_a_user_error(tmp_path, source):
    state = flash_names(source.state_dict())
    state["batch_encoder.embedding.weight"] = torch.zeros(3, 512)  # would change hidden states
    folder = write_folder(tmp_path / "ckpt", released_args(), state)
    with pytest.raises(UserError, match=r"1 unexpected \(batch_encoder.embedding.weight\)"):
        load_checkpoint(folder)


def test_attention_weights_are_never_left_fresh(tmp_path, source):
    state = flash_names(source.state_dict())
    del state["transformer_encoder.layers.1.self_attn.Wqkv.weight"]
    folder = write_folder(tmp_path / "ckpt", released_args(), state)
    with pytest.raises(UserError, match="layers.1.self_attn.in_proj_weight"):
        load_checkpoint(folder, allow_missing=["*"])


def test_duplicate_attention_names_are_a_user_error(tmp_path, source):
    state = flash_names(source.state_dict())
    state["transformer_encoder.layers.0.self_attn.in_proj_bias"] = torch.zeros(1536)
    folder = write_folder(tmp_path / "ckpt", released_args(), state)
    with pytest.raises(UserError, match="both"):
        load_checkpoint(folder)
