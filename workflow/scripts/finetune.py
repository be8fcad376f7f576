import json
from pathlib import Path

import pandas as pd

from superweights.model.train import TrainSettings, finetune
from superweights.model.train_plots import plot_confusion, plot_training_curves
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    out = snakemake.output  # noqa: F821
    finetune(
        snakemake.input.data,  # noqa: F821
        Path(out.metrics).parent,
        TrainSettings(**snakemake.params.settings),  # noqa: F821
        snakemake.input.init,  # noqa: F821
    )
    metrics = json.loads(Path(out.metrics).read_text())
    plot_confusion(metrics, out.confusion)
    plot_training_curves(pd.read_csv(out.history, sep="\t"), out.curve)
