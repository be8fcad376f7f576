from superweights import gene_effects
from superweights.rule_io import rule_log

with rule_log(snakemake):
    gene_effects.run(
        snakemake.input,
        snakemake.output,
        gene_effects.GeneEffectSettings(**snakemake.params.settings),
        n_unconfirmed=snakemake.params.channels["n_unconfirmed"],
    )
