rule fetch:
    output:
        h5ad="results/{dataset}/raw/data.h5ad",
    log:
        "results/{dataset}/logs/fetch.log",
    benchmark:
        "results/{dataset}/benchmarks/fetch.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        source=dataset_source,
        config=dataset_config,
    script:
        "../scripts/fetch.py"


rule preprocess:
    input:
        data="results/{dataset}/raw/data.h5ad",
        vocab=checkpoint_vocab,
    output:
        h5ad="results/{dataset}/preprocess/tokenised.h5ad",
        qc=report(
            "results/{dataset}/preprocess/qc.tsv",
            caption="../report/qc_table.rst",
            category="1. Data",
        ),
        figure=report(
            "results/{dataset}/preprocess/qc.png",
            caption="../report/qc_figure.rst",
            category="1. Data",
        ),
    log:
        "results/{dataset}/logs/preprocess.log",
    benchmark:
        "results/{dataset}/benchmarks/preprocess.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=dataset_section("preprocess"),
    script:
        "../scripts/preprocess.py"
