rule ablate:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint="results/{dataset}/finetune/checkpoint",
        candidates="results/{dataset}/probe/candidates.tsv",
    output:
        confirmed=report(
            "results/{dataset}/ablate/confirmed.tsv",
            caption="../report/ablate_confirmed.rst",
            category="4. Pruning",
        ),
        nulls="results/{dataset}/ablate/nulls.tsv",
        topk="results/{dataset}/ablate/topk.tsv",
        scaling="results/{dataset}/ablate/scaling.tsv",
        shift="results/{dataset}/ablate/shift.tsv",
        strata="results/{dataset}/ablate/strata.tsv",
        trend="results/{dataset}/ablate/trend.tsv",
        cells="results/{dataset}/ablate/cells.tsv",
        cells_h5ad="results/{dataset}/ablate/cells.h5ad",
        summary="results/{dataset}/ablate/summary.json",
        forest=report(
            "results/{dataset}/ablate/forest.png",
            caption="../report/ablate_forest.rst",
            category="4. Pruning",
        ),
        null_histograms=report(
            "results/{dataset}/ablate/null_histograms.png",
            caption="../report/ablate_nulls.rst",
            category="4. Pruning",
        ),
        scaling_figure=report(
            "results/{dataset}/ablate/scaling.png",
            caption="../report/ablate_scaling.rst",
            category="4. Pruning",
        ),
        prediction_shift=report(
            "results/{dataset}/ablate/prediction_shift.png",
            caption="../report/ablate_shift.rst",
            category="4. Pruning",
        ),
        celltype_effect=report(
            "results/{dataset}/ablate/celltype_effect.png",
            caption="../report/ablate_celltypes.rst",
            category="4. Pruning",
        ),
    log:
        "results/{dataset}/logs/ablate.log",
    benchmark:
        "results/{dataset}/benchmarks/ablate.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        settings=ablate_settings,
        probe_splits=config["probe"]["splits"],
    script:
        "../scripts/ablate.py"
