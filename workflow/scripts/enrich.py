import pandas as pd

from superweights.enrich import EnrichSettings, GeneSetSettings, enrich_candidates, load_gene_sets
from superweights.enrich_plots import plot_candidates
from superweights.rule_io import rule_log

with rule_log(snakemake):
    params = snakemake.params
    out_dir = snakemake.output.enrich
    genes = pd.read_csv(snakemake.input.genes, sep="\t")
    association = pd.read_csv(snakemake.input.association, sep="\t")
    null_genes = pd.read_csv(snakemake.input.null_genes, sep="\t")
    causal = pd.read_csv(snakemake.input.causal, sep="\t")
    null_causal = pd.read_csv(snakemake.input.null_causal, sep="\t")
    gene_sets = load_gene_sets(GeneSetSettings(**params.gene_sets))
    settings = EnrichSettings(**params.settings)
    enrich_candidates(genes, gene_sets, settings, out_dir, association, null_genes, causal,
                      null_causal)  # fmt: skip
    plot_candidates(out_dir)
