from superweights import gene_effects_base
from superweights.rule_io import rule_log

with rule_log(snakemake):
    gene_effects_base.run(
        snakemake.input,
        snakemake.output,
        gene_effects_base.GeneEffectSettings(**snakemake.params.settings),
        n_unconfirmed=snakemake.params.channels["n_unconfirmed"],
        mask_ratio=snakemake.params.ablate["mask_ratio"],
    )
