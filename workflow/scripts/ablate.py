from pathlib import Path

from superweights.ablate import AblateSettings, ablate, write_outputs
from superweights.ablate_plots import write_figures
from superweights.rule_io import rule_log

with rule_log(snakemake):  # noqa: F821
    inp = snakemake.input  # noqa: F821
    result = ablate(
        inp.data,
        inp.checkpoint,
        inp.candidates,
        AblateSettings(**snakemake.params.settings),  # noqa: F821
    )
    out_dir = Path(snakemake.output.collapse).parent  # noqa: F821
    write_outputs(result, out_dir)
    write_figures(result, out_dir)
