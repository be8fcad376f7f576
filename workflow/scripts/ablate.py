from superweights.ablate import AblateSettings, ablate, write_outputs
from superweights.ablate_plots import write_figures
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp = snakemake.input
    result = ablate(
        inp.data,
        inp.checkpoint,
        inp.candidates,
        AblateSettings(**snakemake.params.settings),
        selection_splits=tuple(snakemake.params.probe_splits),
    )
    write_outputs(result, snakemake.output)
    write_figures(result, snakemake.output)
