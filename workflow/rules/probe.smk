rule probe:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        checkpoint="results/{dataset}/finetune/checkpoint",
    output:
        candidates=report(
            "results/{dataset}/probe/candidates.tsv",
            caption="../report/probe_candidates.rst",
            category="3. Probe",
        ),
        layers="results/{dataset}/probe/layers.tsv",
        layernorm="results/{dataset}/probe/layernorm.tsv",
        cells="results/{dataset}/probe/cells.tsv",
        summary="results/{dataset}/probe/summary.json",
        layer_spikes=report(
            "results/{dataset}/probe/layer_spikes.png",
            caption="../report/probe_layers.rst",
            category="3. Probe",
        ),
        cell_spikes=report(
            "results/{dataset}/probe/cell_spikes.png",
            caption="../report/probe_cells.rst",
            category="3. Probe",
        ),
    log:
        "results/{dataset}/logs/probe.log",
    benchmark:
        "results/{dataset}/benchmarks/probe.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    params:
        settings=config["probe"],
    script:
        "../scripts/probe.py"
