from pathlib import Path

from superweights.probe_cells import ProbeSettings, probe_checkpoint, write_outputs
from superweights.probe_plots import write_figures
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    inp = snakemake.input  # noqa: F821
    result = probe_checkpoint(
        inp.data,
        inp.checkpoint,
        ProbeSettings(**snakemake.params.settings),  # noqa: F821
    )
    out_dir = Path(snakemake.output.candidates).parent  # noqa: F821
    write_outputs(result, out_dir)
    write_figures(result, out_dir)
