rule cell_map:
    input:
        cells="results/{dataset}/ablate/cells.h5ad",
        data="results/{dataset}/preprocess/tokenised.h5ad",
    output:
        cells="results/{dataset}/cells/cells.h5ad",
        association=report(
            "results/{dataset}/cells/association.tsv",
            caption="../report/cells_association.rst",
            category="5. Genes and pathways",
        ),
        summary="results/{dataset}/cells/summary.json",
        figure=report(
            "results/{dataset}/cells/umap.png",
            caption="../report/cells_umap.rst",
            category="5. Genes and pathways",
        ),
    log:
        "results/{dataset}/logs/cell_map.log",
    benchmark:
        "results/{dataset}/benchmarks/cell_map.tsv"
    conda:
        "../../envs/cells.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        settings=dataset_section("channels"),
    script:
        "../scripts/cell_map.py"
