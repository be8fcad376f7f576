# Find and explain super weights in scGPT models of Alzheimer's disease brain cells.
# Run: snakemake --cores N   (config/config.yaml = offline demo; see README.md)
import os


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/ablate.smk"
include: "workflow/rules/cells.smk"
include: "workflow/rules/persistence.smk"
include: "workflow/rules/genes.smk"
include: "workflow/rules/enrich.smk"
include: "workflow/rules/control.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/report.smk"


# Run by Snakemake itself, not submitted: compute nodes often cannot reach the internet
# (fetch downloads), and the report is a few seconds of work.
localrules:
    fetch,
    report,


rule all:
    default_target: True
    input:
        all_outputs(),
        expand("results/{dataset}/genes/genes_causal.tsv", dataset=DATASETS),
        expand("results/{dataset}/base/genes/genes_causal.tsv", dataset=DATASETS),
