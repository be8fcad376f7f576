use rule probe as probe_base with:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint=init_checkpoint,
    output:
        candidates="results/{dataset}/base/probe/candidates.tsv",
        layers="results/{dataset}/base/probe/layers.tsv",
        layernorm="results/{dataset}/base/probe/layernorm.tsv",
        cells="results/{dataset}/base/probe/cells.tsv",
        summary="results/{dataset}/base/probe/summary.json",
        layer_spikes="results/{dataset}/base/probe/layer_spikes.png",
        cell_spikes="results/{dataset}/base/probe/cell_spikes.png",
    log:
        "results/{dataset}/logs/probe_base.log",
    benchmark:
        "results/{dataset}/benchmarks/probe_base.tsv"


# A starting checkpoint has no classifier: the ablate script confirms its candidates alone
# (no follow-up tables), by the masked-expression log-likelihood.
use rule ablate as confirm_base with:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint=init_checkpoint,
        candidates="results/{dataset}/base/probe/candidates.tsv",
    output:
        confirmed="results/{dataset}/base/confirm/confirmed.tsv",
        nulls="results/{dataset}/base/confirm/nulls.tsv",
        topk="results/{dataset}/base/confirm/topk.tsv",
        summary="results/{dataset}/base/confirm/summary.json",
    log:
        "results/{dataset}/logs/confirm_base.log",
    benchmark:
        "results/{dataset}/benchmarks/confirm_base.tsv"
    params:
        score="masked-expression",


# Spike statistics over training: pretraining's (when it ran here), then fine-tuning's.
TRAINING_PHASES = (
    ["finetune"] if config["model"]["checkpoint"] else ["pretrain", "finetune"]
)


rule persistence:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        base=init_checkpoint,
        finetuned="results/{dataset}/finetune/checkpoint",
        base_confirmed="results/{dataset}/base/confirm/confirmed.tsv",
        finetuned_confirmed="results/{dataset}/ablate/confirmed.tsv",
        base_candidates="results/{dataset}/base/probe/candidates.tsv",
        finetuned_candidates="results/{dataset}/probe/candidates.tsv",
        spikes=expand(
            "results/{{dataset}}/{phase}/spikes_over_training.tsv",
            phase=TRAINING_PHASES,
        ),
    output:
        table=report(
            "results/{dataset}/persistence/persistence.tsv",
            caption="../report/persistence_table.rst",
            category="4. Pruning",
        ),
        figure=report(
            "results/{dataset}/persistence/persistence.png",
            caption="../report/persistence_figure.rst",
            category="4. Pruning",
        ),
        spikes_figure=report(
            "results/{dataset}/persistence/spikes_over_training.png",
            caption="../report/spikes_figure.rst",
            category="4. Pruning",
        ),
    log:
        "results/{dataset}/logs/persistence.log",
    benchmark:
        "results/{dataset}/benchmarks/persistence.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    params:
        settings=ablate_settings,
    script:
        "../scripts/persistence.py"
