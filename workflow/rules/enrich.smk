rule map_channels:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint="results/{dataset}/finetune/checkpoint",
        candidates="results/{dataset}/ablate/confirmed.tsv",
        nulls="results/{dataset}/ablate/nulls.tsv",
    output:
        genes="results/{dataset}/channels/genes.tsv",
        genes_of_interest=report(
            "results/{dataset}/channels/genes_of_interest.tsv",
            caption="../report/channels_goi.rst",
            category="5. Genes and pathways",
        ),
        cls="results/{dataset}/channels/cls.tsv",
        channels="results/{dataset}/channels/channels.tsv",
        null_genes="results/{dataset}/channels/null_genes.tsv",
        summary="results/{dataset}/channels/summary.json",
    log:
        "results/{dataset}/logs/map_channels.log",
    benchmark:
        "results/{dataset}/benchmarks/map_channels.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    params:
        settings=dataset_section("channels"),
    script:
        "../scripts/map_channels.py"


rule enrich:
    input:
        # the primary ranking: causal gene effects (logp_z), and its null weights' rankings
        causal="results/{dataset}/genes/genes_causal.tsv",
        null_causal="results/{dataset}/genes/null_gene_effects.tsv",
        # descriptive: where the unit fires (token-level map)
        genes="results/{dataset}/channels/genes.tsv",
        null_genes="results/{dataset}/channels/null_genes.tsv",
        association="results/{dataset}/cells/association.tsv",
    output:
        enrich=directory("results/{dataset}/enrich"),
    log:
        "results/{dataset}/logs/enrich.log",
    benchmark:
        "results/{dataset}/benchmarks/enrich.tsv"
    conda:
        "../../envs/enrich.yaml"
    threads: config["enrich"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        gene_sets=gene_set_settings(),
        settings=config["enrich"],
    script:
        "../scripts/enrich.py"


# The starting model's causal ranking (masked-expression effects, expr_z) against the same
# libraries; no token- or cell-level ranking exists for it.
use rule enrich as enrich_base with:
    input:
        causal="results/{dataset}/base/genes/genes_causal.tsv",
        null_causal="results/{dataset}/base/genes/null_gene_effects.tsv",
    output:
        enrich=directory("results/{dataset}/base/enrich"),
    log:
        "results/{dataset}/logs/enrich_base.log",
    benchmark:
        "results/{dataset}/benchmarks/enrich_base.tsv"
