from pathlib import Path

from superweights.report import build_report
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    # results/<dataset>/report.html: the results folder is two levels up
    build_report(
        Path(snakemake.output[0]).parent.parent,  # noqa: F821
        snakemake.wildcards.dataset,  # noqa: F821
        snakemake.config,  # noqa: F821
        snakemake.output[0],  # noqa: F821
    )
