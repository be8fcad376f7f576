from superweights.quantize import QuantizeSettings, quantize_checkpoint, write_outputs
from superweights.quantize_plots import write_figures
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp = snakemake.input
    result = quantize_checkpoint(
        inp.data,
        inp.checkpoint,
        inp.super_weights,
        QuantizeSettings(**snakemake.params.settings),
    )
    write_outputs(result, snakemake.output)
    write_figures(result.table, snakemake.output)
