from superweights import report
from superweights.rule_io import rule_log

with rule_log(snakemake):
    report.run(
        snakemake.input,
        snakemake.output,
        snakemake.params.config,
        dataset=snakemake.wildcards.dataset,
    )
