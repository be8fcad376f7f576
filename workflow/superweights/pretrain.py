"""The pretrain stage: masked-expression pretraining of a new model on the data's genes."""

from pathlib import Path

from .data.preprocess import read_tokenised
from .data.vocab import genes_vocab
from .model.train import ModelSettings, TrainSettings, pretrain


def run(inputs, outputs, settings: TrainSettings, *, model: ModelSettings) -> Path:
    """`pretrain` a model of architecture `model` on `inputs["data"]`, its vocabulary the
    data's genes (as preprocess chose them without a checkpoint), into the folder `outputs`
    (checkpoint/, history.tsv, spikes_over_training.tsv); returns the checkpoint folder."""
    data = read_tokenised(inputs["data"])
    return pretrain(data, outputs, model, settings, genes_vocab(data.var_names))
