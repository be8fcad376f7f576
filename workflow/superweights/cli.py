"""`superweights <stage> ...`: run one pipeline stage without Snakemake."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from . import __version__
from .errors import UserError
from .outputs import all_or_nothing, check_writable
from .rule_io import USER_ERROR_EXIT, setup_logging
from .settings import deprecated, section_schema

REPO_CONFIG = Path("config/config.yaml")
"""The repository's demo config, used by `fetch` and `report` when run from the repository."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help; descriptions and examples kept as written."""

    def _get_help_string(self, action):
        if action.required or "(default:" in (action.help or ""):  # none, or told in words
            return action.help
        return super()._get_help_string(action)


def schema_help(settings_class) -> dict[str, str]:
    """Each field's description, as the config schema states it (`settings.from_schema`)."""
    return {
        f.name: f.metadata["description"].replace("%", "%%")
        for f in dataclasses.fields(settings_class)
        if "description" in f.metadata
    }


def settings_arguments(parser: argparse.ArgumentParser, settings_class) -> None:
    """Add one --option per dataclass field: the dataclass default, the schema's description."""
    helps = schema_help(settings_class)
    for f in dataclasses.fields(settings_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": default, "help": helps.get(f.name)}
        listed = "array" in f.metadata.get("schema", {}).get("type", [])
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list | tuple) or (default is None and listed):
            item = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*", type=item, metavar="X", **kwargs)
        elif isinstance(default, dict):
            parser.add_argument(flag, type=json.loads, metavar="JSON", **kwargs)
        else:
            kind = str if default is None else type(default)
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **kwargs)
    for key in deprecated_keys(settings_class):
        parser.add_argument("--" + key.replace("_", "-"), dest=f"deprecated_{key}",
                            help=argparse.SUPPRESS)  # fmt: skip


def deprecated_keys(settings_class) -> dict[str, str]:
    """The deprecated keys of a settings class's config section, each with its description."""
    keys = section_schema(settings_class.section)["properties"]
    return {k: " ".join(s["description"].split()) for k, s in keys.items() if deprecated(s)}


def settings_from(args: argparse.Namespace, settings_class):
    """Build a settings dataclass from parsed arguments; a deprecated option given is ignored
    with a one-line warning."""
    for key, reason in deprecated_keys(settings_class).items():
        if getattr(args, f"deprecated_{key}", None) is not None:
            print(f"warning: --{key.replace('_', '-')} is deprecated: {reason}", file=sys.stderr)
    names = [f.name for f in dataclasses.fields(settings_class)]
    return settings_class(**{n: getattr(args, n) for n in names})


def by_name(args: argparse.Namespace, *names: str) -> dict:
    """The parsed arguments `names` by name: a stage's inputs, as a rule names them."""
    return {name: getattr(args, name) for name in names}


def cmd_demo_data(args) -> None:
    from .data.demo import write_demo_rosmap, write_demo_seaad

    if args.rosmap:
        write_demo_rosmap(args.out, seed=args.seed)
    else:
        write_demo_seaad(
            args.out,
            n_cells=args.n_cells,
            n_genes=args.n_genes,
            n_donors=args.n_donors,
            seed=args.seed,
        )


def load_config(path: Path) -> dict:
    """Read and validate a workflow config file, absent keys at their defaults; a deprecated
    key is dropped with a one-line warning."""
    from .config import drop_deprecated, validate_config

    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    warning = drop_deprecated(config)
    if warning:
        print(warning, file=sys.stderr)
    return validate_config(config)


def default_config() -> dict:
    """The demo dataset with every setting at the packaged schema's default."""
    from .config import validate_config

    return validate_config({"datasets": [{"name": "demo", "source": "demo"}]})


def config_for(args) -> dict:
    """`--config`; else config/config.yaml where it exists; else, for the demo, the defaults."""
    if args.config is not None:
        return load_config(args.config)
    if REPO_CONFIG.is_file():
        return load_config(REPO_CONFIG)
    if args.dataset == "demo":
        return default_config()
    raise UserError(
        f"no config for dataset '{args.dataset}': pass --config with the config that defines it"
        f" ({REPO_CONFIG} is not in {Path.cwd()})"
    )


def cmd_fetch(args) -> None:
    from .data import fetch

    config = config_for(args)
    sources = {d["name"]: d["source"] for d in config["datasets"]}
    source = args.source or sources.get(args.dataset)
    if source is None:
        raise UserError(f"dataset '{args.dataset}' is not in the config's datasets")
    fetch.run({}, {"h5ad": args.out}, config, source=source, cache_dir=args.cache_dir)


def cmd_preprocess(args) -> None:
    from .data import preprocess

    out = Path(args.out)
    outputs = {"h5ad": out, "qc": out.with_suffix(".qc.tsv"), "figure": out.with_suffix(".qc.png")}
    inputs = {"data": args.input, "vocab": args.vocab}
    tokenised, _ = preprocess.run(
        inputs, outputs, settings_from(args, preprocess.PreprocessSettings)
    )
    print(f"wrote {out} ({tokenised.n_obs} cells x {tokenised.n_vars} genes) and {outputs['qc']}")


def cmd_pretrain(args) -> None:
    from . import pretrain
    from .model.train import ModelSettings, TrainSettings

    settings, model = settings_from(args, TrainSettings), settings_from(args, ModelSettings)
    pretrain.run({"data": args.input}, args.out_dir, settings, model=model)


def cmd_finetune(args) -> None:
    from . import finetune
    from .model.train import TrainSettings

    inputs = {"data": args.input, "init": args.init}
    finetune.run(inputs, args.out_dir, settings_from(args, TrainSettings))


def cmd_probe(args) -> None:
    from . import probe_cells

    inputs = by_name(args, "data", "checkpoint")
    result = probe_cells.run(inputs, args.out, settings_from(args, probe_cells.ProbeSettings))
    print(result.summary["statement"])


def cmd_confirm(args) -> None:
    from . import ablate

    inputs = by_name(args, "data", "checkpoint", "candidates")
    settings = settings_from(args, ablate.AblateSettings)
    result = ablate.run(inputs, args.out, settings, score=args.score)
    for row in result.to_frame().itertuples():
        print(f"{row.candidate}: {row.reason}")


def cmd_ablate(args) -> None:
    from . import ablate

    inputs = by_name(args, "data", "checkpoint", "candidates")
    settings = settings_from(args, ablate.AblateSettings)
    result = ablate.run(inputs, args.out, settings, selection_splits=args.probe_splits)
    for candidate, reason in result.summary["decisions"].items():
        print(f"{candidate}: {reason}")


def cmd_cells(args) -> None:
    from . import cell_map

    settings = by_name(args, "min_cells", "seed", "n_permutations")
    result = cell_map.run(by_name(args, "cells", "data"), args.out, settings)
    for note in result.summary["notes"]:
        print(note)
    print(f"wrote the cell map and the gene-effect association to {args.out}")


def cmd_map(args) -> None:
    from . import channels

    inputs = by_name(args, "data", "checkpoint", "candidates", "nulls")
    result = channels.run(inputs, args.out, settings_from(args, channels.ChannelSettings))
    print(
        f"wrote gene rankings of {result.summary.get('n_channels', 'the')} channel(s) to {args.out}"
    )


def cmd_genes(args) -> None:
    from . import gene_effects, gene_effects_base

    inputs = by_name(args, "data", "checkpoint", "candidates", "nulls")
    settings = settings_from(args, gene_effects.GeneEffectSettings)
    if args.masked_expression:
        result = gene_effects_base.run(
            inputs, args.out, settings, n_unconfirmed=args.n_unconfirmed,
            mask_ratio=args.mask_ratio,
        )  # fmt: skip
    else:
        result = gene_effects.run(inputs, args.out, settings, n_unconfirmed=args.n_unconfirmed)
    n = len(result.summary["candidates"])
    print(f"wrote causal gene rankings of {n} candidate(s) to {args.out}")


def cmd_enrich(args) -> None:
    from . import enrich

    inputs = by_name(args, *enrich.RANKING_INPUTS)
    gene_sets = settings_from(args, enrich.GeneSetSettings)
    enrich.run(inputs, args.out, settings_from(args, enrich.EnrichSettings), gene_sets=gene_sets)
    print(f"wrote enrichment tables and plots to {args.out}")


def cmd_quantize(args) -> None:
    from . import quantize

    inputs = by_name(args, "data", "checkpoint", "super_weights")
    settings = settings_from(args, quantize.QuantizeSettings)
    quantize.run(inputs, args.out, settings)
    print(f"wrote quantize.tsv, contrasts.tsv and quantize.png to {args.out}")


def cmd_persistence(args) -> None:
    from . import persistence
    from .ablate import AblateSettings

    inputs = by_name(
        args, "data", "base", "finetuned", "base_confirmed", "finetuned_confirmed",
        "base_candidates", "finetuned_candidates", "spikes",
    )  # fmt: skip
    table = persistence.run(inputs, args.out, settings_from(args, AblateSettings))
    for row in table.itertuples():
        print(f"{row.candidate}: {row.status}")


def cmd_report(args) -> None:
    from . import report

    config = config_for(args)
    path = report.run(args.results, {"html": args.out}, config, dataset=args.dataset)
    print(f"wrote {path}")


def cmd_inspect(args) -> None:
    from .model.inspection import inspect_checkpoint

    print("\n".join(inspect_checkpoint(args.folder).lines()))


def model_stage(sub, name: str, help_text: str, checkpoint="fine-tuned checkpoint folder"):
    """A stage parser that runs a checkpoint (`--checkpoint`) on tokenised data (`--data`)."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--checkpoint", required=True, help=checkpoint)
    p.add_argument("--data", required=True, help="tokenised .h5ad from preprocess")
    return p


def build_parser() -> argparse.ArgumentParser:
    from .settings import (
        AblateSettings,
        ChannelSettings,
        DemoSettings,
        EnrichSettings,
        GeneEffectSettings,
        GeneSetSettings,
        ModelSettings,
        PreprocessSettings,
        ProbeSettings,
        QuantizeSettings,
        TrainSettings,
    )

    parser = argparse.ArgumentParser(
        prog="superweights",
        description=__doc__ + "\n\nRun `superweights <stage> --help` for a stage's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")

    p = sub.add_parser("demo-data", help="write the embedded SEA-AD-shaped demo h5ad")
    p.add_argument("--out", required=True, help="output .h5ad (or folder with --rosmap)")
    settings_arguments(p, DemoSettings)
    p.add_argument("--rosmap", action="store_true", help="write the ROSMAP-shaped folder instead")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("fetch", help="download or copy a dataset to one h5ad")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--dataset", default="demo", help="a name under the config's datasets:")
    p.add_argument("--source", choices=["demo", "seaad", "rosmap", "local"],
                   help="data source (default: the dataset's source in the config)")  # fmt: skip
    p.add_argument("--out", required=True, help="output raw .h5ad")
    p.add_argument("--cache-dir", help="downloads kept here (default: download.cache_dir)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("preprocess", help="QC, HVG, binning and donor split of any h5ad")
    p.add_argument("input", help="input .h5ad with raw counts")
    p.add_argument("--out", required=True, help="tokenised .h5ad (QC table and figure beside it)")
    p.add_argument(
        "--vocab", help="a checkpoint's vocab.json or folder (default: the data's own genes)"
    )
    settings_arguments(p, PreprocessSettings)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("pretrain", help="masked-expression pretraining from scratch")
    p.add_argument("input", help="tokenised .h5ad from preprocess")
    p.add_argument("--out-dir", required=True, help="writes checkpoint/ and history.tsv here")
    settings_arguments(p, ModelSettings)
    settings_arguments(p, TrainSettings)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="cell-type classifier from a checkpoint folder")
    p.add_argument("input", help="tokenised .h5ad from preprocess")
    p.add_argument("--init", required=True, help="checkpoint folder (released scGPT or ours)")
    p.add_argument("--out-dir", required=True, help="writes checkpoint/, metrics.json, figures")
    settings_arguments(p, TrainSettings)
    p.set_defaults(func=cmd_finetune)

    p = model_stage(sub, "probe", "super-weight probe of a fine-tuned checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    settings_arguments(p, ProbeSettings)
    p.set_defaults(func=cmd_probe)

    for name, help_text in (
        ("confirm", "confirm candidates of any checkpoint by pruning against a null"),
        ("ablate", "the pruning stage of a fine-tuned classifier, with all its tables"),
    ):
        p = model_stage(sub, name, help_text, "checkpoint folder")
        p.add_argument("--candidates", required=True, help="candidates.tsv (module, row, col)")
        p.add_argument("--out", required=True, help="output folder")
        settings_arguments(p, AblateSettings)
        if name == "confirm":
            p.add_argument("--score", default="auto",
                           choices=["auto", "cell-type", "masked-expression"],
                           help="the score pruning is judged by; auto: cell-type log-likelihood"
                                " where the checkpoint has a classifier, else"
                                " masked-expression")  # fmt: skip
            p.set_defaults(func=cmd_confirm)
        else:
            p.add_argument("--probe-splits", nargs="*", default=["val"], metavar="SPLIT",
                           help="splits whose cells chose the candidates (kept apart from the"
                                " cells that judge them)")  # fmt: skip
            p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("cells", help="cell map and gene-effect association of ablate's cells")
    p.add_argument("--cells", required=True, help="ablate's cells.h5ad")
    p.add_argument("--data", required=True, help="tokenised .h5ad from preprocess")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--min-cells", type=int, default=10, help="cells per type and per gene")
    p.add_argument("--seed", type=int, default=0, help="UMAP and permutation seed")
    p.add_argument("--n-permutations", type=int, default=999,
                   help="within donor × cell type permutations of the association")  # fmt: skip
    p.set_defaults(func=cmd_cells)

    p = model_stage(sub, "map", "super channels to genes")
    p.add_argument("--candidates", required=True, help="ablate's confirmed.tsv")
    p.add_argument("--nulls", help="ablate's nulls.tsv: use the confirmation's null draws")
    p.add_argument("--out", required=True, help="output folder")
    settings_arguments(p, ChannelSettings)
    p.set_defaults(func=cmd_map)

    p = model_stage(sub, "genes", "causal gene effects of the super weights (gene-token ablation)")
    p.add_argument("--candidates", required=True, help="ablate's confirmed.tsv")
    p.add_argument("--nulls", help="ablate's nulls.tsv: use the confirmation's null draws")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--n-unconfirmed", type=int, default=0,
        help="strongest unconfirmed candidates too (as channels.n_unconfirmed)",
    )  # fmt: skip
    p.add_argument(
        "--masked-expression", action="store_true",
        help="a starting (base) checkpoint, judged by the masked-expression objective: each"
             " masked gene's change of log-likelihood when the weight is pruned (candidates"
             " and nulls from the base confirmation)",
    )  # fmt: skip
    p.add_argument("--mask-ratio", type=float, default=0.15,
                   help="with --masked-expression: share of each cell's genes masked (as the"
                        " base confirmation's ablate.mask_ratio)")  # fmt: skip
    settings_arguments(p, GeneEffectSettings)
    p.epilog = (
        "example:\n  superweights genes --checkpoint finetune/checkpoint --data tokenised.h5ad"
        " --candidates ablate/confirmed.tsv --nulls ablate/nulls.tsv --out genes/\n"
        "  superweights genes --masked-expression --checkpoint pretrain/checkpoint --data"
        " tokenised.h5ad --candidates base/confirm/confirmed.tsv --nulls base/confirm/nulls.tsv"
        " --out base/genes/"
    )
    p.set_defaults(func=cmd_genes)

    p = sub.add_parser("enrich", help="gene-set enrichment of the gene rankings")
    p.add_argument(
        "--genes", required=True,
        help="genes.tsv from map (the token-level ranking: where the unit fires)",
    )  # fmt: skip
    p.add_argument("--null-genes", help="null_genes.tsv from map: its null weights' rankings")
    p.add_argument("--causal", help="genes_causal.tsv from genes: the primary, causal ranking"
                                    " (path_z)")  # fmt: skip
    p.add_argument("--null-causal", help="null_gene_effects.tsv from genes: the causal"
                                         " ranking's null weights' rankings")  # fmt: skip
    p.add_argument("--association", help="association.tsv from cells: enrich it too")
    p.add_argument("--out", required=True, help="output folder")
    settings_arguments(p, GeneSetSettings)
    settings_arguments(p, EnrichSettings)
    p.set_defaults(func=cmd_enrich)

    p = model_stage(sub, "quantize", "weight and W8A8 quantization with super-weight holdout")
    p.add_argument("--super-weights", required=True, help="ablate's confirmed.tsv")
    p.add_argument("--out", required=True, help="output folder")
    settings_arguments(p, QuantizeSettings)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("persistence", help="super weights of the starting and the fine-tuned"
                       " checkpoint, side by side")  # fmt: skip
    p.add_argument("--data", required=True, help="tokenised .h5ad from preprocess")
    p.add_argument("--base", required=True, help="starting checkpoint folder")
    p.add_argument("--finetuned", required=True, help="fine-tuned checkpoint folder")
    p.add_argument("--base-confirmed", required=True,
                   help="the starting checkpoint's confirmed.tsv (confirm)")  # fmt: skip
    p.add_argument("--finetuned-confirmed", required=True, help="ablate's confirmed.tsv")
    p.add_argument("--base-candidates", help="the starting checkpoint's probe candidates.tsv")
    p.add_argument("--finetuned-candidates", help="the fine-tuned checkpoint's probe"
                                                  " candidates.tsv")  # fmt: skip
    p.add_argument("--spikes", nargs="*", default=[], metavar="TSV",
                   help="spikes_over_training.tsv of pretraining (if run) and fine-tuning, in"
                        " that order")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    settings_arguments(p, AblateSettings)
    p.set_defaults(func=cmd_persistence)

    p = sub.add_parser("report", help="the HTML report of a results/<dataset> folder")
    p.add_argument("--results", required=True, help="results/<dataset> folder")
    p.add_argument("--dataset", default="demo", help="the dataset's name in the config")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--out", required=True, help="output .html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("inspect", help="what a checkpoint folder holds and how it will be used")
    p.add_argument("folder", help="checkpoint folder (args.json, vocab.json, best_model.pt)")
    p.set_defaults(func=cmd_inspect)
    document_stages(sub)
    return parser


CONFIG_HELP = (
    f"workflow config (default: {REPO_CONFIG} where it exists, else the packaged defaults,"
    " which describe only the demo dataset)"
)

EXAMPLES = {
    "demo-data": "superweights demo-data --out demo.h5ad --n-cells 2000",
    "fetch": "superweights fetch --dataset demo --out results/demo/raw.h5ad",
    "preprocess": "superweights preprocess raw.h5ad --out tokenised.h5ad --vocab scGPT_brain/",
    "pretrain": "superweights pretrain tokenised.h5ad --out-dir pretrain/ --epochs 4",
    "finetune": "superweights finetune tokenised.h5ad --init scGPT_brain/ --out-dir finetune/",
    "probe": "superweights probe --checkpoint finetune/checkpoint --data tokenised.h5ad"
    " --out probe/",
    "confirm": "superweights confirm --checkpoint scGPT_brain/ --data tokenised.h5ad"
    " --candidates probe/candidates.tsv --out confirm/",
    "ablate": "superweights ablate --checkpoint finetune/checkpoint --data tokenised.h5ad"
    " --candidates probe/candidates.tsv --out ablate/",
    "cells": "superweights cells --cells ablate/cells.h5ad --data tokenised.h5ad --out cells/",
    "map": "superweights map --checkpoint finetune/checkpoint --data tokenised.h5ad"
    " --candidates ablate/confirmed.tsv --nulls ablate/nulls.tsv --out channels/",
    "enrich": "superweights enrich --causal genes/genes_causal.tsv --null-causal"
    " genes/null_gene_effects.tsv --genes channels/genes.tsv --null-genes"
    " channels/null_genes.tsv --out enrich/",
    "quantize": "superweights quantize --checkpoint finetune/checkpoint --data tokenised.h5ad"
    " --super-weights ablate/confirmed.tsv --out quantize/",
    "persistence": "superweights persistence --data tokenised.h5ad --base pretrain/checkpoint"
    " --finetuned finetune/checkpoint --base-confirmed base/confirm/confirmed.tsv"
    " --finetuned-confirmed ablate/confirmed.tsv --out persistence/",
    "report": "superweights report --results results/demo --out report.html",
    "inspect": "superweights inspect scGPT_brain/",
}


def document_stages(sub) -> None:
    """Each stage parser: its one-line help as description, an example, defaults shown."""
    helps = {action.dest: action.help for action in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = HelpFormatter
        if p.description is None and helps.get(name):
            p.description = helps[name][0].upper() + helps[name][1:] + "."
        if p.epilog is None and name in EXAMPLES:
            p.epilog = f"example:\n  {EXAMPLES[name]}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        outs = [getattr(args, name, None) for name in ("out", "out_dir")]
        check_writable(Path(out).parent for out in outs if out)
        with all_or_nothing():
            args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
