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
            "results/{dataset}/preprocess/tokenised.h5ad",
            "results/{dataset}/preprocess/qc.png",
        ],
        dataset=DATASETS,
    )
