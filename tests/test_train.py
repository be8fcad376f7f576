"""Pretraining and fine-tuning on a tiny synthetic tokenised set: outputs, metrics,
determinism, resume after interruption, user errors, figures."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import TRAIN_CLASSES, TRAIN_MODEL, TRAIN_SETTINGS, die_in_epoch_2, training_cells
from superweights.errors import UserError
from superweights.model import train
from superweights.model.args import CellCut, cell_cut
from superweights.model.checkpoint import load_checkpoint, read_state_dict
from superweights.model.train import (
    TrainSettings,
    classification_metrics,
    finetune,
    pretrain,
)
from superweights.model.train_plots import plot_confusion, plot_training_curves
from superweights.outputs import all_or_nothing


@pytest.fixture(scope="module")
def data(vocab):
    return training_cells(vocab)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data, vocab):
    return pretrain(data, tmp_path_factory.mktemp("pre"), TRAIN_MODEL, TRAIN_SETTINGS, vocab)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data, pretrained):
    out = tmp_path_factory.mktemp("ft")
    return out, finetune(data, out, TRAIN_SETTINGS, pretrained)


def without_seconds(metrics: dict) -> dict:
    timings = ("seconds", "train_seconds", "spike_seconds")
    history = [{k: v for k, v in row.items() if k not in timings} for row in metrics["history"]]
    return {**metrics, "history": history}


def assert_same_weights(folder_a, folder_b):
    a, b = read_state_dict(folder_a), read_state_dict(folder_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_pretrain_writes_checkpoint_and_history(pretrained, data):
    assert sorted(p.name for p in pretrained.parent.iterdir()) == [
        "checkpoint", "history.tsv", "spikes_over_training.tsv",
    ]  # fmt: skip
    model, config, vocab = load_checkpoint(pretrained)
    assert config.n_cls == 0 and config.d_model == 32 and config.do_mvc
    assert cell_cut(pretrained) == CellCut(TRAIN_SETTINGS.max_seq_len, TRAIN_SETTINGS.seed)
    # the vocabulary holds the data's genes and the special tokens, nothing else
    assert set(vocab) == set(data.var_names) | {"<pad>", "<cls>", "<eoc>"}
    assert vocab["<pad>"] == len(vocab) - 3
    history = pd.read_csv(pretrained.parent / "history.tsv", sep="\t")
    assert list(history.columns) == [
        "epoch", "train_loss", "val_loss", "train_seconds", "spike_seconds", "seconds",
    ]  # fmt: skip
    assert history["epoch"].tolist() == [1, 2]
    # masked values are bins 1..50; a model that learned anything beats their variance
    assert history["val_loss"].iloc[-1] < 2 * data.X.data.var()


def test_finetune_writes_outputs_with_sane_metrics(finetuned, data):
    out, metrics = finetuned
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "history.tsv", "metrics.json", "spikes_over_training.tsv",
    ]  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == metrics
    n_test = int((data.obs["split"] == "test").sum())
    assert metrics["n_cells"] == n_test and metrics["classes"] == TRAIN_CLASSES
    assert metrics["accuracy"] > 0.8  # chance is 1/3
    assert set(metrics["per_class_f1"]) == set(TRAIN_CLASSES)
    assert -math.log(3) < metrics["mean_log_likelihood"] <= 0
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    assert np.asarray(metrics["confusion"]).sum() == n_test
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(history.columns) == list(train.HISTORY_COLUMNS)
    best = history.loc[history["epoch"] == metrics["best_epoch"], "val_loss"].item()
    assert best == history["val_loss"].min()
    model, config, _ = load_checkpoint(out / "checkpoint")
    assert config.n_cls == 3
    args = json.loads((out / "checkpoint" / "args.json").read_text())
    assert args["classes"] == TRAIN_CLASSES
    # later stages cut cells as fine-tuning did
    assert args["max_seq_len"] == TRAIN_SETTINGS.max_seq_len
    assert args["subsample_seed"] == TRAIN_SETTINGS.seed


CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="bit-exact results are a CPU property (bf16 GPU kernels)"
)


@CPU_ONLY
def test_finetune_is_deterministic(tmp_path, finetuned, data, pretrained):
    out, metrics = finetuned
    again = finetune(data, tmp_path, TRAIN_SETTINGS, pretrained)
    assert without_seconds(again) == without_seconds(metrics)
    assert_same_weights(out / "checkpoint", tmp_path / "checkpoint")


@CPU_ONLY
def test_interrupted_run_resumes_to_the_same_model(
    tmp_path, monkeypatch, finetuned, data, pretrained
):
    out, metrics = finetuned
    real_step = train.train_step
    monkeypatch.setattr(
        train, "train_step", die_in_epoch_2(real_step, data, TRAIN_SETTINGS.batch_size)
    )
    with pytest.raises(KeyboardInterrupt), all_or_nothing():  # as the CLI runs it
        finetune(data, tmp_path, TRAIN_SETTINGS, pretrained)
    state = torch.load(tmp_path / train.STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and not (tmp_path / "metrics.json").exists()

    monkeypatch.setattr(train, "train_step", real_step)
    resumed = finetune(data, tmp_path, TRAIN_SETTINGS, pretrained)
    assert without_seconds(resumed) == without_seconds(metrics)
    assert_same_weights(out / "checkpoint", tmp_path / "checkpoint")
    assert not (tmp_path / train.STATE_FILE).exists()


def test_state_of_other_settings_is_not_resumed(tmp_path, monkeypatch, data, pretrained):
    other = TrainSettings(**{**vars(TRAIN_SETTINGS), "seed": 7, "epochs": 1})
    reference = finetune(data, tmp_path / "reference", other, pretrained)
    state_file = tmp_path / "state.pt"
    real_step = train.train_step
    monkeypatch.setattr(
        train, "train_step", die_in_epoch_2(real_step, data, TRAIN_SETTINGS.batch_size)
    )
    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "a", TRAIN_SETTINGS, pretrained, state_file=state_file)
    assert torch.load(state_file, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train, "train_step", real_step)
    # resuming this state with epochs=1 would skip training; it must start over instead
    fresh = finetune(data, tmp_path / "b", other, pretrained, state_file=state_file)
    assert without_seconds(fresh) == without_seconds(reference)


def test_a_diverged_training_stops_with_one_line_and_writes_no_checkpoint(
    tmp_path, data, pretrained
):
    broken = data.copy()
    broken.X = broken.X.astype(np.float32)
    broken.X.data[:] = np.nan  # every expression value: the loss is NaN from the first step
    with pytest.raises(UserError, match=r"finetune diverged: .* epoch 1 is nan"):
        finetune(broken, tmp_path, TRAIN_SETTINGS, pretrained)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "metrics.json").exists()


def test_masked_expression_objective_while_finetuning(tmp_path, data, pretrained):
    settings = TrainSettings(**{**vars(TRAIN_SETTINGS), "epochs": 1, "mlm_weight": 0.5})
    metrics = finetune(data, tmp_path, settings, pretrained)
    assert np.isfinite(metrics["history"][0]["train_loss"])
    # the objective adds a masked-value MSE (bins up to 50) to the cross-entropy
    assert metrics["history"][0]["train_loss"] > 5


def test_classification_metrics_by_hand():
    logits = np.log(
        np.array(
            [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]
        )
    )
    labels = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    # predictions 0, 0, 1, 0, 2: class a tp 2, fp 1, fn 0; b tp 1, fn 2; c fp 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class_f1"] == pytest.approx({"a": 0.8, "b": 0.5, "c": 0.0})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    expected_ll = np.log([0.7, 0.6, 0.8, 0.4, 0.2]).mean()
    assert m["mean_log_likelihood"] == pytest.approx(expected_ll)
    assert m["confusion"] == [[2, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert m["n_cells"] == 5 and m["classes"] == ["a", "b", "c"]
    # a class with neither cells nor predictions has no F1 and stays out of the mean
    m = classification_metrics(logits[:4], labels[:4], ["a", "b", "c"])
    assert m["per_class_f1"] == pytest.approx({"a": 0.8, "b": 2 / 3, "c": None})
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_single_class_is_a_user_error(tmp_path, data, pretrained):
    one = data.copy()
    one.obs["cell_type"] = pd.Categorical(["astro"] * one.n_obs)
    with pytest.raises(UserError, match="two or more classes"):
        finetune(one, tmp_path, TRAIN_SETTINGS, pretrained)
    assert not any(tmp_path.iterdir())


def test_data_without_known_genes_is_a_user_error(tmp_path, data, pretrained, vocab):
    renamed = data.copy()
    renamed.var_names = [f"NOT_A_GENE_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(UserError, match="vocabulary"):
        finetune(renamed, tmp_path, TRAIN_SETTINGS, pretrained)
    with pytest.raises(UserError, match="vocabulary"):
        pretrain(renamed, tmp_path, TRAIN_MODEL, TRAIN_SETTINGS, vocab)
    assert not any(tmp_path.iterdir())


def test_warmup_then_cosine_schedule():
    factor = train._schedule(total_steps=100, warmup_fraction=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5)
    assert factor(99) < 0.01


def test_figures(tmp_path, finetuned, pretrained):
    out, metrics = finetuned
    for path in (
        plot_confusion(metrics, tmp_path / "confusion.png"),
        plot_training_curves(pd.read_csv(out / "history.tsv", sep="\t"), tmp_path / "ft.png"),
        plot_training_curves(
            pd.read_csv(pretrained.parent / "history.tsv", sep="\t"), tmp_path / "pre.png"
        ),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "ft.png", "pre.png"]


def test_logs_get_one_line_per_epoch_and_no_progress_bar(tmp_path, data, vocab, capfd, caplog):
    """Off a terminal (a rule's log file), tqdm draws nothing; each epoch is one log line."""
    import logging

    settings = TrainSettings(epochs=1, batch_size=32, max_seq_len=16)
    with caplog.at_level(logging.INFO, logger="superweights.model.train"):
        pretrain(data, tmp_path, TRAIN_MODEL, settings, vocab)
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err  # no bar in a non-terminal stream
    steps = -(-int((data.obs["split"] == "train").sum()) // 32)
    epochs = [r.getMessage() for r in caplog.records if " epoch 1/1: " in r.getMessage()]
    assert len(epochs) == 1 and f": {steps} steps, train_loss " in epochs[0], epochs
    assert " s (" in epochs[0] and "s training" in epochs[0]


def test_classification_metrics_equal_the_former_hand_computation():
    """scikit-learn's confusion matrix and F1 give what the hand-written counts gave."""

    def by_hand(logits, labels, n):
        predicted = logits.argmax(axis=1)
        confusion = np.zeros((n, n), dtype=np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        hits = np.diag(confusion)
        both = confusion.sum(axis=1) + confusion.sum(axis=0)
        return confusion, np.where(both > 0, 2 * hits / np.maximum(both, 1), np.nan)

    rng = np.random.default_rng(7)
    for trial in range(50):
        n = int(rng.integers(2, 8))
        cells = int(rng.integers(1, 40))
        labels = rng.integers(0, max(1, n - trial % 3), cells)  # some classes without cells
        logits = rng.normal(size=(cells, n))
        logits[:, n - 1] -= 5 * (trial % 2)  # and some never predicted
        m = classification_metrics(logits, labels, [f"k{i}" for i in range(n)])
        confusion, f1 = by_hand(logits, labels, n)
        assert m["confusion"] == confusion.tolist()
        got = np.array([np.nan if v is None else v for v in m["per_class_f1"].values()])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(f1))
        np.testing.assert_allclose(got[~np.isnan(f1)], f1[~np.isnan(f1)], rtol=0, atol=1e-12)
        assert m["macro_f1"] == pytest.approx(float(np.nanmean(f1)), abs=1e-12)
        assert m["accuracy"] == pytest.approx(np.trace(confusion) / cells, abs=1e-12)
