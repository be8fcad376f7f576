from pathlib import Path

from superweights.report import build_report
from superweights.rule_io import rule_log

with rule_log(snakemake):
    # results/<dataset>/report.html: the results folder is two levels up
    build_report(
        Path(snakemake.output[0]).parent.parent,
        snakemake.wildcards.dataset,
        snakemake.config,
        snakemake.output[0],
    )
