from pathlib import Path

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
    out_dir = Path(snakemake.output.candidates).parent
    write_outputs(result, out_dir)
    write_figures(result, out_dir)
