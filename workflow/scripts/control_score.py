from superweights import control
from superweights.rule_io import rule_log

with rule_log(snakemake):
    control.run_score(snakemake.input, snakemake.output)
