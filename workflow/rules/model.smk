rule pretrain:
    input:
        "results/{dataset}/preprocess/tokenised.h5ad",
    output:
        checkpoint=directory("results/{dataset}/pretrain/checkpoint"),
        history="results/{dataset}/pretrain/history.tsv",
        spikes="results/{dataset}/pretrain/spikes_over_training.tsv",
    log:
        "results/{dataset}/logs/pretrain.log",
    benchmark:
        "results/{dataset}/benchmarks/pretrain.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        launcher=launcher,
        out_dir=subpath(output.history, parent=True),
        options=cli_options(config["model"]["architecture"] | config["pretrain"]),
    shell:
        "{params.launcher} pretrain {input:q} --out-dir {params.out_dir:q} {params.options} 2> {log:q}"


rule finetune:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        init=init_checkpoint,
    output:
        checkpoint=directory("results/{dataset}/finetune/checkpoint"),
        history="results/{dataset}/finetune/history.tsv",
        spikes="results/{dataset}/finetune/spikes_over_training.tsv",
        metrics=report(
            "results/{dataset}/finetune/metrics.json",
            caption="../report/finetune_metrics.rst",
            category="2. Model",
        ),
        confusion=report(
            "results/{dataset}/finetune/confusion.png",
            caption="../report/finetune_confusion.rst",
            category="2. Model",
        ),
        curve=report(
            "results/{dataset}/finetune/training_curve.png",
            caption="../report/finetune_curve.rst",
            category="2. Model",
        ),
    log:
        "results/{dataset}/logs/finetune.log",
    benchmark:
        "results/{dataset}/benchmarks/finetune.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        launcher=launcher,
        out_dir=subpath(output.metrics, parent=True),
        options=cli_options(config["finetune"]),
    shell:
        "{params.launcher} finetune {input.data:q} --init {input.init:q}"
        " --out-dir {params.out_dir:q} {params.options} 2> {log:q}"
