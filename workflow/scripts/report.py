from superweights.report import build_report
from superweights.rule_io import rule_log

with rule_log(snakemake):
    build_report(
        snakemake.input,
        snakemake.wildcards.dataset,
        snakemake.params.config,
        snakemake.output.html,
    )
