"""The whole workflow started from a released-format scGPT folder instead of our pretraining.

The folder is what scGPT publishes, in small: its args.json keys, its human vocabulary,
and `best_model.pt` as a plain state_dict with flash-attention names and no classifier
head. Where scgpt 0.2.4 is installed, the weights come from its own TransformerModel.
"""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import flash_names, released_args, run_snakemake
from superweights.data.vocab import load_vocab
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.scgpt_reference import load_reference_module

pytestmark = pytest.mark.slow

ARGS = released_args(embsize=32, nheads=2, d_hid=64, nlayers=2)


def released_state(vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """Random weights of the small architecture, keyed as scGPT names them (no classifier)."""
    torch.manual_seed(0)
    if importlib.util.find_spec("scgpt"):
        model = load_reference_module().TransformerModel(
            ntoken=len(vocab), d_model=ARGS["embsize"], nhead=ARGS["nheads"],
            d_hid=ARGS["d_hid"], nlayers=ARGS["nlayers"], vocab=vocab,
            dropout=ARGS["dropout"], pad_token="<pad>", pad_value=ARGS["pad_value"],
            do_mvc=ARGS["MVC"], use_fast_transformer=False,
        )  # fmt: skip
    else:
        config = ScGPTConfig.from_args(ARGS, ntoken=len(vocab), pad_token_id=vocab["<pad>"])
        model = ScGPTModel(config)
    state = model.state_dict()
    return flash_names({k: v for k, v in state.items() if not k.startswith("cls_decoder.")})


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    """The small workflow from a released-format folder; returns (results dir, state_dict)."""
    vocab = load_vocab()
    state = released_state(vocab)
    folder = tmp_path_factory.mktemp("released")
    (folder / "args.json").write_text(json.dumps(ARGS))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    torch.save(state, folder / "best_model.pt")
    workdir = tmp_path_factory.mktemp("released_run")
    config = "model=" + json.dumps({"checkpoint": str(folder.resolve())})
    result = run_snakemake(workdir, "--cores", "2", "--config", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "results" / "small", state


def test_released_folder_replaces_pretraining(released_run):
    results, _ = released_run
    assert not (results / "pretrain").exists()
    for rel in (
        "finetune/checkpoint/model.safetensors",
        "base/probe/candidates.tsv",
        "base/confirm/confirmed.tsv",
        "persistence/persistence.tsv",
        "report.html",
    ):
        path = results / rel
        assert path.is_file() and path.stat().st_size > 0, rel


def test_persistence_reads_the_released_weights(released_run):
    results, state = released_run
    table = pd.read_csv(results / "persistence/persistence.tsv", sep="\t")
    base = pd.read_csv(results / "base/confirm/confirmed.tsv", sep="\t")
    assert len(base) > 0 and table["tested_in_base"].sum() == len(base)
    for w in table.itertuples(index=False):
        released = state[f"{w.module}.weight"][w.row, w.col].item()
        assert np.float32(w.weight_base) == np.float32(released), w.candidate
