"""Data-parallel fine-tuning: 2 CPU processes (gloo) give the single-process result."""

import json
import subprocess
import sys

import anndata as ad
import pytest
import torch

from helpers import die_in_epoch_2, make_counts_adata
from superweights.data.preprocess import PreprocessSettings, preprocess
from superweights.data.vocab import load_vocab
from superweights.model import train
from superweights.model.distributed import SINGLE, RankSlices, World, loss_weight
from superweights.model.tokens import EpochSampler
from superweights.model.train import ModelSettings, TrainSettings, pretrain
from superweights.outputs import write_h5ad


def test_rank_slices_partition_each_global_batch():
    base = EpochSampler(23, shuffle=True, seed=3)
    single = [list(base)[i : i + 8] for i in range(0, 23, 8)]
    ranks = [list(RankSlices(base, 8, World(rank, 3, rank))) for rank in range(3)]
    assert all(len(r) == len(single) for r in ranks)
    for step, batch in enumerate(single):
        assert sum((r[step] for r in ranks), []) == batch
    assert list(RankSlices(base, 8, SINGLE)) == single


def test_loss_weights_make_the_rank_average_the_global_mean():
    base = EpochSampler(23, shuffle=True, seed=1)
    losses = torch.rand(23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worlds = [World(rank, 3, rank) for rank in range(3)]
    ranks = [list(RankSlices(base, 8, world)) for world in worlds]
    sizes = RankSlices(base, 8, worlds[0]).global_sizes()
    assert sizes == [8, 8, 7]
    for step, n_global in enumerate(sizes):
        batches = [r[step] for r in ranks]
        weighted = [
            loss_weight(len(b), n_global, world) * losses[b].mean()
            for b, world in zip(batches, worlds, strict=True)
        ]
        global_mean = losses[sum(batches, [])].mean()
        torch.testing.assert_close(sum(weighted) / 3, global_mean)  # what DDP's average gives


def test_a_last_batch_smaller_than_the_world_is_dropped():
    base = EpochSampler(9, shuffle=False)
    assert len(RankSlices(base, 8, World(0, 2, 0))) == 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, request):
    counts = request.getfixturevalue("counts_h5ad_module")
    folder = tmp_path_factory.mktemp("ddp")
    tokenised, _ = preprocess(counts, PreprocessSettings(min_genes=10, n_hvg=60, seed=0))
    write_h5ad(tokenised, folder / "tok.h5ad")
    model = ModelSettings(d_model=32, nhead=2, d_hid=32, nlayers=2, dropout=0.0)
    train = TrainSettings(epochs=1, batch_size=32, max_seq_len=32)
    pretrain(folder / "tok.h5ad", folder / "pre", model, train, load_vocab())
    return folder


@pytest.fixture(scope="module")
def counts_h5ad_module(tmp_path_factory, vocab_genes):
    path = tmp_path_factory.mktemp("counts") / "counts.h5ad"
    make_counts_adata(vocab_genes).write_h5ad(path)
    return path


def finetune(folder, out, processes):
    launcher = [sys.executable, "-m", "superweights.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc_per_node={processes}", "-m", "superweights.cli"]
    args = ["finetune", str(folder / "tok.h5ad"), "--init", str(folder / "pre" / "checkpoint")]
    args += ["--out-dir", str(out), "--epochs", "2", "--batch-size", "16", "--max-seq-len", "32"]
    result = subprocess.run(launcher + args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_two_processes_match_one(pretrained):
    finetune(pretrained, pretrained / "one", 1)
    finetune(pretrained, pretrained / "two", 2)
    one = json.loads((pretrained / "one" / "metrics.json").read_text())
    two = json.loads((pretrained / "two" / "metrics.json").read_text())
    assert one["accuracy"] == two["accuracy"]
    assert one["mean_log_likelihood"] == pytest.approx(two["mean_log_likelihood"], abs=1e-4)
    a = torch.load(pretrained / "one" / "checkpoint" / "best_model.pt", weights_only=True)
    b = torch.load(pretrained / "two" / "checkpoint" / "best_model.pt", weights_only=True)
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("in_proj_bias"):
            # The key bias gets no gradient (softmax ignores a per-query constant): Adam turns
            # its float noise into lr-sized steps, so it differs by design. Compare q and v.
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
    assert not (pretrained / "two" / "train_state.pt").exists()


def test_two_processes_resume_a_killed_run(pretrained, monkeypatch):
    """A run killed in epoch 2 resumes under torchrun from its epoch-1 state (the state does
    not depend on the number of processes) and ends where an uninterrupted run ends."""
    tokenised, init = pretrained / "tok.h5ad", pretrained / "pre" / "checkpoint"
    out = pretrained / "killed"
    step = die_in_epoch_2(train.train_step, ad.read_h5ad(tokenised), batch_size=16)
    monkeypatch.setattr(train, "train_step", step)
    settings = TrainSettings(epochs=2, batch_size=16, max_seq_len=32)  # finetune()'s options
    with pytest.raises(KeyboardInterrupt):
        train.finetune(tokenised, out, settings, init)
    assert torch.load(out / train.STATE_FILE, weights_only=True)["epoch"] == 1

    log = finetune(pretrained, out, 2)
    assert "resuming from" in log and "after epoch 1" in log
    if not (pretrained / "one" / "metrics.json").exists():
        finetune(pretrained, pretrained / "one", 1)
    one = json.loads((pretrained / "one" / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["epochs_run"] == 2 and resumed["accuracy"] == one["accuracy"]
    assert resumed["mean_log_likelihood"] == pytest.approx(one["mean_log_likelihood"], abs=1e-4)
    assert not (out / train.STATE_FILE).exists()
