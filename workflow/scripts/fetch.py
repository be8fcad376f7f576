from pathlib import Path

from superweights.data.fetch import fetch
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    fetch(
        snakemake.params.source,  # noqa: F821
        snakemake.config,  # noqa: F821
        Path(snakemake.output[0]),  # noqa: F821
        Path(snakemake.params.cache_dir),  # noqa: F821
    )
