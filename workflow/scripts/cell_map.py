from superweights import cell_map
from superweights.rule_io import rule_log

with rule_log(snakemake):
    cell_map.run(snakemake.input, snakemake.output, snakemake.params.settings)
