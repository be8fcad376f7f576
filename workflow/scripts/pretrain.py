from superweights.data.vocab import load_vocab
from superweights.model.train import ModelSettings, TrainSettings, pretrain
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    params = snakemake.params  # noqa: F821
    pretrain(
        snakemake.input[0],  # noqa: F821
        snakemake.output.checkpoint.rsplit("/", 1)[0],  # noqa: F821
        ModelSettings(**params.architecture),
        TrainSettings(**params.settings),
        load_vocab(),
    )
