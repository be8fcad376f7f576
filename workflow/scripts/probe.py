from superweights import probe_cells
from superweights.rule_io import rule_log

with rule_log(snakemake):
    probe_cells.run(
        snakemake.input,
        snakemake.output,
        probe_cells.ProbeSettings(**snakemake.params.settings),
    )
