from superweights import quantize
from superweights.rule_io import rule_log

with rule_log(snakemake):
    quantize.run(
        snakemake.input,
        snakemake.output,
        quantize.QuantizeSettings(**snakemake.params.settings),
    )
