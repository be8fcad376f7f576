from superweights.probe_cells import ProbeSettings, probe_checkpoint, write_outputs
from superweights.probe_plots import write_figures
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp = snakemake.input
    result = probe_checkpoint(
        inp.data,
        inp.checkpoint,
        ProbeSettings(**snakemake.params.settings),
    )
    write_outputs(result, snakemake.output)
    write_figures(result, snakemake.output)
