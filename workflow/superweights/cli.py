"""`superweights <stage> ...`: run one pipeline stage without Snakemake."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from .errors import UserError
from .rule_io import setup_logging


def settings_arguments(parser: argparse.ArgumentParser, settings_class) -> None:
    """Add one --option per dataclass field, with the dataclass defaults."""
    for f in dataclasses.fields(settings_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list | tuple) or default is None:
            item = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*", type=item, default=default, metavar="X")
        elif isinstance(default, dict):
            parser.add_argument(flag, type=json.loads, default=default, metavar="JSON")
        else:
            parser.add_argument(flag, type=type(default), default=default, metavar=f.name.upper())


def settings_from(args: argparse.Namespace, settings_class):
    """Build a settings dataclass from parsed arguments."""
    names = [f.name for f in dataclasses.fields(settings_class)]
    return settings_class(**{n: getattr(args, n) for n in names})


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
    """Read and validate a workflow config file."""
    from .config import validate_config

    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return validate_config(yaml.safe_load(path.read_text()))


def cmd_fetch(args) -> None:
    from .data.fetch import fetch

    config = load_config(args.config)
    sources = {d["name"]: d["source"] for d in config["datasets"]}
    source = args.source or sources.get(args.dataset)
    if source is None:
        raise UserError(f"dataset '{args.dataset}' is not in the config's datasets")
    fetch(source, config, Path(args.out), Path(args.cache_dir))


def cmd_preprocess(args) -> None:
    from .data.preprocess import PreprocessSettings, preprocess
    from .data.qc_plot import plot_qc
    from .outputs import write_h5ad, write_tsv

    tokenised, qc = preprocess(args.input, settings_from(args, PreprocessSettings), args.vocab)
    out = Path(args.out)
    qc_path = write_tsv(out.with_suffix(".qc.tsv"), qc)
    plot_qc(qc, out.with_suffix(".qc.png"))
    write_h5ad(tokenised, out)
    print(f"wrote {out} ({tokenised.n_obs} cells x {tokenised.n_vars} genes) and {qc_path}")


def cmd_pretrain(args) -> None:
    from .data.vocab import load_vocab
    from .model.train import ModelSettings, TrainSettings, pretrain

    pretrain(
        args.input,
        args.out_dir,
        settings_from(args, ModelSettings),
        settings_from(args, TrainSettings),
        load_vocab(),
    )


def cmd_finetune(args) -> None:
    from .model.distributed import init_world
    from .model.train import TrainSettings, finetune
    from .model.train_plots import plot_confusion, plot_training_curves

    metrics = finetune(args.input, args.out_dir, settings_from(args, TrainSettings), args.init)
    if init_world().main:
        out = Path(args.out_dir)
        plot_confusion(metrics, out / "confusion.png")
        plot_training_curves(metrics["history"], out / "training_curve.png")


def cmd_probe(args) -> None:
    from .probe_cells import ProbeSettings, probe_checkpoint, write_outputs
    from .probe_plots import write_figures

    result = probe_checkpoint(args.data, args.checkpoint, settings_from(args, ProbeSettings))
    write_outputs(result, args.out)
    write_figures(result, args.out)
    print(result.summary["statement"])


def build_parser() -> argparse.ArgumentParser:
    from .data.preprocess import PreprocessSettings
    from .model.train import ModelSettings, TrainSettings
    from .probe_cells import ProbeSettings

    parser = argparse.ArgumentParser(prog="superweights", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("demo-data", help="write the embedded SEA-AD-shaped demo h5ad")
    p.add_argument("--out", required=True, help="output .h5ad (or folder with --rosmap)")
    p.add_argument("--n-cells", type=int, default=8000)
    p.add_argument("--n-genes", type=int, default=2400)
    p.add_argument("--n-donors", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rosmap", action="store_true", help="write the ROSMAP-shaped folder instead")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("fetch", help="download or copy a dataset to one h5ad")
    p.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    p.add_argument("--dataset", default="demo", help="a name under the config's datasets:")
    p.add_argument("--source", choices=["demo", "seaad", "rosmap", "local"])
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default="results/cache")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("preprocess", help="QC, HVG, binning and donor split of any h5ad")
    p.add_argument("input", help="input .h5ad with raw counts")
    p.add_argument("--out", required=True, help="tokenised .h5ad (QC table and figure beside it)")
    p.add_argument("--vocab", help="vocab.json (default: scGPT's census vocabulary)")
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

    p = sub.add_parser("probe", help="super-weight probe of a fine-tuned checkpoint")
    p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder")
    p.add_argument("--data", required=True, help="tokenised .h5ad from preprocess")
    p.add_argument("--out", required=True, help="output folder")
    settings_arguments(p, ProbeSettings)
    p.set_defaults(func=cmd_probe)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
