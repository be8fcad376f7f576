rule gene_effects:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint="results/{dataset}/finetune/checkpoint",
        candidates="results/{dataset}/ablate/confirmed.tsv",
        nulls="results/{dataset}/ablate/nulls.tsv",
    output:
        genes_causal="results/{dataset}/genes/genes_causal.tsv",
        null_gene_effects="results/{dataset}/genes/null_gene_effects.tsv",
        summary="results/{dataset}/genes/summary.json",
    log:
        "results/{dataset}/logs/gene_effects.log",
    benchmark:
        "results/{dataset}/benchmarks/gene_effects.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        settings=dataset_section("genes"),
        # the channel map's candidates: confirmed ones plus its n_unconfirmed exploratory ones
        channels=dataset_section("channels"),
    script:
        "../scripts/gene_effects.py"


rule gene_effects_base:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint=init_checkpoint,
        candidates="results/{dataset}/base/confirm/confirmed.tsv",
        nulls="results/{dataset}/base/confirm/nulls.tsv",
    output:
        genes_causal="results/{dataset}/base/genes/genes_causal.tsv",
        null_gene_effects="results/{dataset}/base/genes/null_gene_effects.tsv",
        summary="results/{dataset}/base/genes/summary.json",
    log:
        "results/{dataset}/logs/gene_effects_base.log",
    benchmark:
        "results/{dataset}/benchmarks/gene_effects_base.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    params:
        settings=dataset_section("genes"),
        channels=dataset_section("channels"),
        # the base confirmation's masked-expression objective (its mask_ratio)
        ablate=dataset_section("ablate"),
    script:
        "../scripts/gene_effects_base.py"
