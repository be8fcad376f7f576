import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version, validate

# Torch-free imports: the workflow is parsed without torch, gseapy or scanpy.
from superweights.config import (
    dataset_configs,
    drop_deprecated,
    stage_settings,
    validate_config,
)
from superweights.errors import UserError
from superweights.model.args import read_args_and_vocab
from superweights.rule_io import USER_ERROR_EXIT

min_version("9.0")


def check_settings():
    """Stop now, before any job, on a value the schema or a stage's settings reject: one
    line, exit 2. The library's constructors check what the schema cannot (e.g. a top-k
    fraction of 0); Snakemake's own validation then fills in the schema's defaults.
    Deprecated keys are dropped with a one-line warning.
    """
    warning = drop_deprecated(config)
    if warning:
        print(warning, file=sys.stderr)
    try:
        validate_config(config)
        stage_settings(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def check_checkpoint():
    """Stop now on a configured checkpoint folder without a usable args.json and vocab.json."""
    if config["model"]["checkpoint"]:
        try:
            read_args_and_vocab(Path(config["model"]["checkpoint"]))
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)


def warn_toy_model_on_real_data():
    """Say loudly when, without model.checkpoint, the demo-sized model would be pretrained
    on real data (a preset used alone): the result is about that toy model, not scGPT.
    """
    real = sorted(d["name"] for d in config["datasets"] if d["source"] != "demo")
    if not config["model"]["checkpoint"] and real:
        arch = config["model"]["architecture"]
        print(
            f"WARNING: model.checkpoint is empty, so a small model "
            f"({arch['nlayers']} layers x {arch['d_model']}) is pretrained here on "
            f"{', '.join(real)} and studied instead of a released scGPT model; set "
            "model.checkpoint (e.g. config/seaad_scgpt.yaml) for biology",
            file=sys.stderr,
        )


def per_dataset_configs():
    """Each dataset's config (its overrides merged in); stop now on a bad one."""
    try:
        return dataset_configs(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


check_settings()
validate(config, "../superweights/config.schema.yaml")
check_checkpoint()
warn_toy_model_on_real_data()

DATASET_CONFIGS = per_dataset_configs()
SOURCES = {d["name"]: d["source"] for d in config["datasets"]}
DATASETS = list(SOURCES)


def dataset_config(wildcards):
    """The whole config of the wildcard's dataset."""
    return DATASET_CONFIGS[wildcards.dataset]


def dataset_section(section):
    """A params function: the `section` settings of the wildcard's dataset."""

    def settings(wildcards):
        return DATASET_CONFIGS[wildcards.dataset][section]

    return settings


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


def checkpoint_vocab(wildcards):
    """The configured checkpoint's vocab.json; none (the data's genes) without a checkpoint."""
    folder = config["model"]["checkpoint"]
    return os.path.join(folder, "vocab.json") if folder else []


def gene_set_settings():
    """Gene-set settings with a configured resource folder resolved against the workflow
    (none: the shipped one)."""
    settings = dict(config["gene_sets"])
    if settings["resource_dir"]:
        settings["resource_dir"] = os.path.join(
            workflow.basedir, settings["resource_dir"]
        )
    return settings


def cli_options(settings):
    """Command-line options of `superweights <stage>` for a config section."""
    options = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            options.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            options += [f"--{name}", *map(str, value)]
        else:
            options += [f"--{name}", str(value)]
    return " ".join(shlex.quote(o) for o in options)


def launcher(wildcards, resources):
    """The `superweights` CLI in the job's Python, picked as Snakemake picks it for scripts:
    under `--sdm conda` the rule env's `python` (with the library from this workflow's
    folder), else the Python running Snakemake; under torchrun, one process per GPU, when
    given several."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        library = shlex.quote(os.path.join(workflow.basedir, "workflow"))
        python = f"PYTHONPATH={library}${{PYTHONPATH:+:$PYTHONPATH}} python"
    else:
        python = shlex.quote(sys.executable)
    if resources.gpu > 1:
        return (
            f"{python} -m torch.distributed.run --standalone "
            f"--nproc_per_node={resources.gpu} -m superweights.cli"
        )
    return f"{python} -m superweights.cli"


def ablate_settings(wildcards):
    """The dataset's ablate settings; expression effects only where fine-tuning trained the
    decoder."""
    trained = config["finetune"]["mlm_weight"] > 0
    return DATASET_CONFIGS[wildcards.dataset]["ablate"] | {
        "expression_trained": trained
    }


# The positive control's outputs (workflow/rules/control.smk).
CONTROL = "results/{dataset}/control"


def control_paths(outputs, stage, folders=()):
    """The named outputs of a rule (`rules.X.output`) moved from results/{dataset}/<stage>/
    to the control's folder, not in Snakemake's report; `folders`: the names of the outputs
    that are folders (`rules.X.output` does not keep the `directory` flag)."""
    user = f"results/{{dataset}}/{stage}/"
    moved = {}
    for name, path in outputs.items():
        new = f"{CONTROL}/{stage}/{str(path).removeprefix(user)}"
        moved[name] = directory(new) if name in folders else new
    return moved


def control_score_input(wildcards):
    """The control's score for the report, where the dataset runs the control."""
    enabled = DATASET_CONFIGS[wildcards.dataset]["positive_control"]["enabled"]
    return f"results/{wildcards.dataset}/control/score.json" if enabled else []
