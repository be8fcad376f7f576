from snakemake.utils import min_version, validate

min_version("9.0")


validate(config, "../schemas/config.schema.yaml")

SOURCES = {d["name"]: d["source"] for d in config["datasets"]}
DATASETS = list(SOURCES)


wildcard_constraints:
    dataset="|".join(DATASETS),


def dataset_source(wildcards):
    """The source (demo, seaad, rosmap, local) of a dataset."""
    return SOURCES[wildcards.dataset]


def all_outputs():
    """Final outputs of every configured dataset."""
    return expand(
        [
            "results/{dataset}/report.html",
        ],
        dataset=DATASETS,
    )


def init_checkpoint(wildcards):
    """Fine-tuning starts from the configured checkpoint, else from our pretrained model."""
    return (
        config["model"]["checkpoint"]
        or f"results/{wildcards.dataset}/pretrain/checkpoint"
    )


def gene_set_settings():
    """Gene-set settings with the shipped resource folder resolved against the workflow."""
    settings = dict(config["gene_sets"])
    settings["resource_dir"] = os.path.join(workflow.basedir, settings["resource_dir"])
    return settings
