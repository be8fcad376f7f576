# The spike-in positive control (positive_control, docs/control.md): the starting checkpoint
# with a planted super weight, fine-tuned and studied by the same rules as the user's model,
# under results/{dataset}/control/.


rule control_plant:
    input:
        data="results/{dataset}/preprocess/tokenised.h5ad",
        init=init_checkpoint,
    output:
        checkpoint=directory(f"{CONTROL}/plant/checkpoint"),
        planted=f"{CONTROL}/plant/planted.json",
        gene_sets=f"{CONTROL}/plant/gene_sets.tsv",
        data=f"{CONTROL}/tokenised.h5ad",
    log:
        "results/{dataset}/logs/control_plant.log",
    benchmark:
        "results/{dataset}/benchmarks/control_plant.tsv"
    conda:
        "../../envs/control.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        settings=dataset_section("positive_control"),
        # the control is tokenised as fine-tuning tokenises the user's model
        finetune=config["finetune"],
        gene_sets=gene_set_settings(),
    script:
        "../scripts/control_plant.py"


use rule finetune as control_finetune with:
    input:
        data=f"{CONTROL}/tokenised.h5ad",
        init=f"{CONTROL}/plant/checkpoint",
    output:
        **control_paths(rules.finetune.output, "finetune", folders=("checkpoint",)),
    log:
        "results/{dataset}/logs/control_finetune.log",
    benchmark:
        "results/{dataset}/benchmarks/control_finetune.tsv"


use rule probe as control_probe with:
    input:
        data=f"{CONTROL}/tokenised.h5ad",
        checkpoint=f"{CONTROL}/finetune/checkpoint",
    output:
        **control_paths(rules.probe.output, "probe"),
    log:
        "results/{dataset}/logs/control_probe.log",
    benchmark:
        "results/{dataset}/benchmarks/control_probe.tsv"


# The confirmation tests the planted weight alone: the control model's other spikes are not
# what it measures (and at preset power each costs as much as one of the user's).
rule control_candidates:
    input:
        planted=f"{CONTROL}/plant/planted.json",
        candidates=f"{CONTROL}/probe/candidates.tsv",
    output:
        candidates=f"{CONTROL}/probe/planted_candidate.tsv",
    log:
        "results/{dataset}/logs/control_candidates.log",
    conda:
        "../../envs/control.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/control_candidates.py"


use rule ablate as control_ablate with:
    input:
        data=f"{CONTROL}/tokenised.h5ad",
        checkpoint=f"{CONTROL}/finetune/checkpoint",
        candidates=f"{CONTROL}/probe/planted_candidate.tsv",
    output:
        **control_paths(rules.ablate.output, "ablate"),
    log:
        "results/{dataset}/logs/control_ablate.log",
    benchmark:
        "results/{dataset}/benchmarks/control_ablate.tsv"


use rule gene_effects as control_gene_effects with:
    input:
        data=f"{CONTROL}/tokenised.h5ad",
        checkpoint=f"{CONTROL}/finetune/checkpoint",
        candidates=f"{CONTROL}/ablate/confirmed.tsv",
        nulls=f"{CONTROL}/ablate/nulls.tsv",
    output:
        **control_paths(rules.gene_effects.output, "genes"),
    log:
        "results/{dataset}/logs/control_gene_effects.log",
    benchmark:
        "results/{dataset}/benchmarks/control_gene_effects.tsv"


use rule cell_map as control_cell_map with:
    input:
        cells=f"{CONTROL}/ablate/cells.h5ad",
        data=f"{CONTROL}/tokenised.h5ad",
    output:
        **control_paths(rules.cell_map.output, "cells"),
    log:
        "results/{dataset}/logs/control_cell_map.log",
    benchmark:
        "results/{dataset}/benchmarks/control_cell_map.tsv"


# The control's causal ranking only: the token- and cell-level rankings are descriptive.
use rule enrich as control_enrich with:
    input:
        causal=f"{CONTROL}/genes/genes_causal.tsv",
        null_causal=f"{CONTROL}/genes/null_gene_effects.tsv",
    output:
        enrich=directory(f"{CONTROL}/enrich"),
    log:
        "results/{dataset}/logs/control_enrich.log",
    benchmark:
        "results/{dataset}/benchmarks/control_enrich.tsv"


rule control_score:
    input:
        planted=f"{CONTROL}/plant/planted.json",
        candidates=f"{CONTROL}/probe/candidates.tsv",
        confirmed=f"{CONTROL}/ablate/confirmed.tsv",
        genes=f"{CONTROL}/genes/genes_causal.tsv",
        association=f"{CONTROL}/cells/association.tsv",
        enrich=f"{CONTROL}/enrich",
    output:
        score=f"{CONTROL}/score.json",
    log:
        "results/{dataset}/logs/control_score.log",
    conda:
        "../../envs/control.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/control_score.py"
