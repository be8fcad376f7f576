# Find and explain super weights in scGPT models of Alzheimer's disease brain cells.
# Run: snakemake --cores N   (config/config.yaml = offline demo; see README.md)


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
