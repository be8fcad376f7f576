from pathlib import Path

from superweights.data.fetch import fetch
from superweights.rule_io import rule_log

with rule_log(snakemake):
    fetch(
        snakemake.params.source,
        snakemake.params.config,
        Path(snakemake.output.h5ad),
    )
