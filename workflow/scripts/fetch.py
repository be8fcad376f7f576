from superweights.data import fetch
from superweights.rule_io import rule_log

with rule_log(snakemake):
    fetch.run(
        snakemake.input,
        snakemake.output,
        snakemake.params.config,
        source=snakemake.params.source,
    )
