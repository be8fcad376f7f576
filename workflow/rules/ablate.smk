rule ablate:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint="results/{dataset}/finetune/checkpoint",
        candidates="results/{dataset}/probe/candidates.tsv",
    output:
        collapse=report(
            "results/{dataset}/ablate/collapse.tsv",
            caption="../report/ablate_collapse.rst",
            category="4. Pruning",
        ),
        controls="results/{dataset}/ablate/controls.tsv",
        scaling="results/{dataset}/ablate/scaling.tsv",
        shift="results/{dataset}/ablate/shift.tsv",
        strata="results/{dataset}/ablate/strata.tsv",
        confirmed=report(
            "results/{dataset}/ablate/confirmed.tsv",
            caption="../report/ablate_confirmed.rst",
            category="4. Pruning",
        ),
        summary="results/{dataset}/ablate/summary.json",
        conditions_figure=report(
            "results/{dataset}/ablate/ll_by_condition.png",
            caption="../report/ablate_conditions.rst",
            category="4. Pruning",
        ),
        scaling_figure=report(
            "results/{dataset}/ablate/scaling.png",
            caption="../report/ablate_scaling.rst",
            category="4. Pruning",
        ),
        shift_figure=report(
            "results/{dataset}/ablate/prediction_shift.png",
            caption="../report/ablate_shift.rst",
            category="4. Pruning",
        ),
        celltype_figure=report(
            "results/{dataset}/ablate/celltype_collapse.png",
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
        settings=config["ablate"],
    script:
        "../scripts/ablate.py"
