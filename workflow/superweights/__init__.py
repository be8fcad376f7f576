"""Find and explain super weights in scGPT models of Alzheimer's disease brain cells.

The names of `__all__` are imported on first use, so `import superweights` loads no torch:
`from superweights import find_super_weights, confirm_super_weights`. Each pipeline stage has
one runner, `run_<stage>(inputs, outputs, settings, **options)` (its module's `run`, which
the rule script and the `superweights <stage>` command both call): `inputs` are the stage's
input paths by name (a rule's `snakemake.input`, or a dict), `outputs` its output folder or
its output paths by name (`snakemake.output`), `settings` its settings object; it computes
the stage, writes its tables and figures, and returns its result.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # core: any PyTorch model
    "probe": ("find_super_weights", "ProbeResult", "down_projections", "layernorm_outliers"),
    "confirm": ("confirm_super_weights", "Confirmation", "ConfirmSettings", "weight_effects"),
    "editing": ("WeightEdit", "edited_weights", "zeroed", "read_candidates"),
    "scores": ("CellTypeScore", "MaskedExpressionScore"),
    # scGPT stages
    "probe_cells": ("ProbeSettings", "ScgptProbe", "probe_checkpoint", "probe_scgpt"),
    "ablate": ("AblateSettings", "AblationResult", "confirm_checkpoint"),
    "channels": ("ChannelSettings", "ChannelResult", "map_channels"),
    "gene_effects": ("GeneEffectSettings", "GeneEffectResult", "causal_gene_effects"),
    "gene_effects_base": ("base_gene_effects",),
    "cell_map": ("CellMapResult", "map_cells"),
    "enrich": (
        "EnrichSettings",
        "GeneSetSettings",
        "load_gene_sets",
        "enrich_ranking",
        "enrich_candidates",
    ),
    "quantize": ("QuantizeSettings", "Quantization", "quantize_checkpoint", "quantize_weight"),
    "report": ("build_report",),
    # model and data
    "model.scgpt": ("ScGPTModel", "ScGPTConfig"),
    "model.checkpoint": ("load_checkpoint",),
    "model.train": ("ModelSettings", "TrainSettings"),
    "data.preprocess": ("PreprocessSettings", "read_tokenised"),
}
_RUNNERS = {
    "fetch": "data.fetch",
    "preprocess": "data.preprocess",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "probe": "probe_cells",
    "ablate": "ablate",
    "cells": "cell_map",
    "map": "channels",
    "genes": "gene_effects",
    "genes_base": "gene_effects_base",  # genes --masked-expression
    "enrich": "enrich",
    "quantize": "quantize",
    "persistence": "persistence",
    "report": "report",
}
"""Each `superweights <stage>` command's module, whose `run` is `run_<stage>`."""

_SOURCES = {name: (module, name) for module, names in _EXPORTS.items() for name in names}
_SOURCES |= {f"run_{stage}": (module, "run") for stage, module in _RUNNERS.items()}
__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _SOURCES[name]
    value = globals()[name] = getattr(import_module(f".{module}", __name__), attribute)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
