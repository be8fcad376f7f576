from superweights.gene_effects import GeneEffectSettings, gene_effects, write_outputs
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp = snakemake.input
    result = gene_effects(
        inp.data,
        inp.checkpoint,
        inp.candidates,
        GeneEffectSettings(**snakemake.params.settings),
        nulls=inp.nulls,
        n_unconfirmed=snakemake.params.channels["n_unconfirmed"],
    )
    write_outputs(result, snakemake.output)
