from superweights import enrich
from superweights.rule_io import rule_log

with rule_log(snakemake):
    enrich.run(
        snakemake.input,
        snakemake.output,
        enrich.EnrichSettings(**snakemake.params.settings),
        gene_sets=enrich.GeneSetSettings(**snakemake.params.gene_sets),
    )
