from superweights.data import preprocess
from superweights.rule_io import rule_log

with rule_log(snakemake):
    preprocess.run(
        snakemake.input,
        snakemake.output,
        preprocess.PreprocessSettings(**snakemake.params.settings),
    )
