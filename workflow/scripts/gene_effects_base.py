from superweights.gene_effects import GeneEffectSettings, write_outputs
from superweights.gene_effects_base import base_gene_effects
from superweights.rule_io import rule_log

with rule_log(snakemake):
    inp = snakemake.input
    result = base_gene_effects(
        inp.data,
        inp.checkpoint,
        inp.candidates,
        GeneEffectSettings(**snakemake.params.settings),
        nulls=inp.nulls,
        n_unconfirmed=snakemake.params.channels["n_unconfirmed"],
        mask_ratio=snakemake.params.ablate["mask_ratio"],
    )
    write_outputs(result, snakemake.output)
