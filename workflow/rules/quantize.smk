rule quantize:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint="results/{dataset}/finetune/checkpoint",
        super_weights="results/{dataset}/ablate/confirmed.tsv",
    output:
        table=report(
            "results/{dataset}/quantize/quantize.tsv",
            caption="../report/quantize_table.rst",
            category="6. Quantization",
        ),
        contrasts="results/{dataset}/quantize/contrasts.tsv",
        figure=report(
            "results/{dataset}/quantize/quantize.png",
            caption="../report/quantize_figure.rst",
            category="6. Quantization",
        ),
    log:
        "results/{dataset}/logs/quantize.log",
    benchmark:
        "results/{dataset}/benchmarks/quantize.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        settings=config["quantize"],
    script:
        "../scripts/quantize.py"
