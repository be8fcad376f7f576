"""Super activations over training: the recorded statistics equal a standalone probe of the
saved checkpoint, a planted super weight is tracked from the starting checkpoint, resume
keeps the table, and the figure is drawn."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import TRAIN_MODEL, TRAIN_SETTINGS, VOCAB, die_in_epoch_2, tokenised, training_cells
from superweights.errors import UserError
from superweights.model import train
from superweights.model.cells import cell_batches, sample_rows
from superweights.model.checkpoint import load_checkpoint, save_checkpoint
from superweights.model.scgpt import ScGPTConfig, ScGPTModel
from superweights.model.spikes import COLUMNS, SPIKES_FILE, read_spikes
from superweights.model.spikes_plots import plot_spikes
from superweights.model.train import TrainSettings, finetune, pretrain
from superweights.probe import find_super_weights

pytestmark = pytest.mark.usefixtures("one_thread")

CELLS = 24
PLANTED = "transformer_encoder.layers.1.linear2"
RECORDING = replace(TRAIN_SETTINGS, spike_cells=CELLS)
STAT_COLUMNS = ["ratio_in", "ratio_out", "max_in", "max_out", "median_in", "median_out",
                "channel_in", "channel_out", "row", "col", "weight", "resid_ratio"]  # fmt: skip


@pytest.fixture(scope="module")
def data(vocab):
    return training_cells(vocab)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data, vocab):
    return pretrain(data, tmp_path_factory.mktemp("pre"), TRAIN_MODEL, RECORDING, vocab)


def standalone_probe(checkpoint, adata, settings: TrainSettings) -> pd.DataFrame:
    """Round-1 layer statistics of `find_super_weights` on the saved checkpoint, with the
    fixed validation cells picked and tokenised here from the settings."""
    model, config, vocab = load_checkpoint(checkpoint)
    rows = sample_rows(adata.obs["split"].astype(str).to_numpy(), ("val",), CELLS, settings.seed)
    batches = cell_batches(
        adata, vocab, rows, pad_token_id=config.pad_token_id, batch_size=len(rows),
        max_seq_len=settings.max_seq_len, seed=settings.seed, labelled=False,
    )  # fmt: skip

    def run(m):
        for b in batches:
            m(b["gene_ids"], b["values"], b["padding_mask"])

    result = find_super_weights(model, run, "scgpt", max_rounds=1)
    return result.layers_frame().set_index("layer"), model


def recorded(out_dir, epoch: int) -> pd.DataFrame:
    spikes = read_spikes(out_dir / SPIKES_FILE)
    return spikes[(spikes["epoch"] == epoch) & (spikes["record"] == "layer")].set_index("layer")


def assert_agrees_with_checkpoint(out_dir, adata, best_epoch: int, settings) -> None:
    expected, model = standalone_probe(out_dir / "checkpoint", adata, settings)
    got = recorded(out_dir, best_epoch)
    assert list(got.index) == list(expected.index)
    for column in STAT_COLUMNS:
        np.testing.assert_allclose(
            got[column].to_numpy(float), expected[column].to_numpy(float), rtol=1e-5, err_msg=column
        )
    spikes = read_spikes(out_dir / SPIKES_FILE)
    weights = spikes[(spikes["epoch"] == best_epoch) & (spikes["record"] == "weight")]
    modules = dict(model.named_modules())
    for w in weights.itertuples():
        assert w.weight == pytest.approx(
            float(modules[w.module].weight.detach()[w.row, w.col]), rel=1e-6
        )


def test_pretraining_records_every_epoch_and_the_best_equals_a_probe_of_the_checkpoint(
    pretrained, data
):
    out = pretrained.parent
    spikes = read_spikes(out / SPIKES_FILE)
    assert list(spikes.columns) == COLUMNS
    history = pd.read_csv(out / "history.tsv", sep="\t")
    steps = math.ceil((data.obs["split"] == "train").sum() / TRAIN_SETTINGS.batch_size)
    layers = spikes[spikes["record"] == "layer"]
    assert sorted(set(layers["step"])) == [0, steps, 2 * steps]
    assert layers.groupby("step").size().tolist() == [TRAIN_MODEL.nlayers] * 3
    assert set(layers["token_out"]) <= set(data.var_names) | {"<cls>"}
    best = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert_agrees_with_checkpoint(out, data, best, RECORDING)
    other = recorded(out, 3 - best)  # the other epoch's weights differ: the test can fail
    assert not np.allclose(other["max_out"], recorded(out, best)["max_out"])
    # the cost is accounted apart from training and is small
    assert (history["spike_seconds"] > 0).all()
    assert (history["train_seconds"] + history["spike_seconds"] <= history["seconds"] + 0.02).all()


def test_finetuning_records_agree_with_its_checkpoint(tmp_path, data, pretrained):
    metrics = finetune(data, tmp_path, RECORDING, pretrained)
    assert_agrees_with_checkpoint(tmp_path, data, metrics["best_epoch"], RECORDING)
    # fine-tuning's first pass sees the pretrained weights
    expected, _ = standalone_probe(pretrained, data, RECORDING)
    start = read_spikes(tmp_path / SPIKES_FILE).query("step == 0 and record == 'layer'")
    np.testing.assert_allclose(start["ratio_out"], expected["ratio_out"], rtol=1e-5)


def test_planted_super_weight_is_tracked_from_the_starting_checkpoint(tmp_path):
    adata = tokenised()
    torch.manual_seed(0)
    config = ScGPTConfig(ntoken=len(VOCAB), d_model=32, nhead=4, d_hid=48, nlayers=3,
                         pad_token_id=VOCAB["<pad>"])  # fmt: skip
    model = ScGPTModel(config)
    layer = model.transformer_encoder.layers[1]
    with torch.no_grad():  # input channel 9 spikes, and W[5, 9] carries it to the output
        layer.linear1.weight[9] *= 200
        layer.linear2.weight[5, 9] = 5.0
    start = save_checkpoint(model, config, VOCAB, tmp_path / "base")
    settings = TrainSettings(epochs=2, batch_size=32, max_seq_len=17, spike_cells=CELLS,
                             spike_every=4)  # fmt: skip
    finetune(adata, tmp_path / "ft", settings, start)
    spikes = read_spikes(tmp_path / "ft" / SPIKES_FILE)
    planted = spikes[(spikes["record"] == "weight") & (spikes["module"] == PLANTED)
                     & (spikes["row"] == 5) & (spikes["col"] == 9)]  # fmt: skip
    assert set(planted["source"]) == {"super weight"}
    assert planted["weight"].iloc[0] == 5.0
    steps = sorted(set(spikes["step"]))
    assert steps == sorted(set(planted["step"]))  # recorded at every pass
    per_epoch = math.ceil((adata.obs["split"] == "train").sum() / 32)
    assert set(range(0, 2 * per_epoch + 1, 4)) | {per_epoch, 2 * per_epoch} == set(steps)
    layer1 = spikes.query("record == 'layer' and layer == 1 and step == 0").iloc[0]
    assert layer1.decision == "accepted" and layer1.ratio_out > 100
    assert (layer1.row, layer1.col, layer1.channel_in) == (5, 9, 9)
    final = load_checkpoint(tmp_path / "ft" / "checkpoint")[0]
    value = float(dict(final.named_modules())[PLANTED].weight.detach()[5, 9])
    assert planted["weight"].iloc[-1] == pytest.approx(value, rel=1e-6)
    assert plot_spikes([spikes], tmp_path / "spikes.png").stat().st_size > 10000


def test_an_interrupted_run_resumes_with_the_same_table(tmp_path, monkeypatch, data, pretrained):
    uninterrupted = tmp_path / "once"
    finetune(data, uninterrupted, RECORDING, pretrained)
    real_step = train.train_step
    monkeypatch.setattr(
        train, "train_step", die_in_epoch_2(real_step, data, TRAIN_SETTINGS.batch_size)
    )
    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "twice", RECORDING, pretrained)
    monkeypatch.setattr(train, "train_step", real_step)
    finetune(data, tmp_path / "twice", RECORDING, pretrained)
    a, b = (
        read_spikes(d / SPIKES_FILE).drop(columns="seconds")
        for d in (uninterrupted, tmp_path / "twice")
    )
    pd.testing.assert_frame_equal(a, b)


def test_recording_off_writes_an_empty_table_and_a_blank_figure(tmp_path, data, pretrained):
    finetune(data, tmp_path, replace(TRAIN_SETTINGS, epochs=1, spike_cells=0), pretrained)
    spikes = read_spikes(tmp_path / SPIKES_FILE)
    assert spikes.empty and list(spikes.columns) == COLUMNS
    assert "spike_seconds" not in pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert plot_spikes([spikes], tmp_path / "blank.png").is_file()


def test_negative_settings_are_refused():
    with pytest.raises(UserError, match="spike_cells"):
        TrainSettings(spike_cells=-1)
    with pytest.raises(UserError, match="spike_every"):
        TrainSettings(spike_every=-2)


def test_the_figure_joins_pretraining_and_fine_tuning(tmp_path, pretrained, data):
    pre = read_spikes(pretrained.parent / SPIKES_FILE)
    tuned = pre.assign(phase="finetune")
    path = plot_spikes([pre, tuned], tmp_path / "both.png")
    assert path.stat().st_size > 10000
