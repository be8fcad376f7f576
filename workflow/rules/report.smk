rule report:
    input:
        qc="results/{dataset}/preprocess/qc.tsv",
        metrics="results/{dataset}/finetune/metrics.json",
        probe="results/{dataset}/probe/candidates.tsv",
        ablate="results/{dataset}/ablate/collapse.tsv",
        genes="results/{dataset}/channels/genes_of_interest.tsv",
        enrich="results/{dataset}/enrich",
        quantize="results/{dataset}/quantize/quantize.tsv",
    output:
        report(
            "results/{dataset}/report.html",
            caption="../report/pathway_report.rst",
            category="7. Pathway report",
        ),
    log:
        "results/{dataset}/logs/report.log",
    conda:
        "../../envs/enrich.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/report.py"
