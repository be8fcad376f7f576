"""Outputs get the mode the umask gives: a shared results folder stays readable by the lab."""

import os
import stat

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from helpers import CHECKPOINT_VOCAB, random_model, released_args
from superweights.model.checkpoint import load_checkpoint, save_checkpoint
from superweights.outputs import current_umask, write_h5ad, write_json, write_text, write_tsv


@pytest.fixture(params=[0o022, 0o002], ids=["022", "002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_checkpoint_folder_and_files_follow_the_umask(tmp_path, umask):
    model = random_model(released_args(), n_cls=3)
    folder = save_checkpoint(
        model, model.config, CHECKPOINT_VOCAB, tmp_path / "results" / "checkpoint"
    )
    assert mode(folder) == 0o777 & ~umask  # not mkdtemp's 0o700
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [
        "args.json",
        "best_model.pt",
        "model.safetensors",
        "vocab.json",
    ]
    for path in files:  # model.safetensors was -rw------- whatever the umask
        assert mode(path) == 0o666 & ~umask, path.name
    save_checkpoint(model, model.config, CHECKPOINT_VOCAB, folder)  # replacing keeps the modes
    assert mode(folder) == 0o777 & ~umask
    assert {mode(p) for p in folder.iterdir()} == {0o666 & ~umask}
    load_checkpoint(folder)


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    written = [
        write_text(tmp_path / "a" / "note.txt", "text\n"),
        write_json(tmp_path / "a" / "summary.json", {"x": 1}),
        write_tsv(tmp_path / "b" / "table.tsv", pd.DataFrame({"x": [1]})),
        write_h5ad(adata, tmp_path / "c" / "cells.h5ad"),
    ]
    for path in written:
        assert mode(path) == 0o666 & ~umask, path.name
        assert mode(path.parent) == 0o777 & ~umask, path.parent.name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []
