"""Every stage's settings, with defaults and descriptions read from the config schema.

`config.schema.yaml` states each setting's type, default and description once. Each class
here names its config section (`from_schema`) and declares only its fields' names and
types: the defaults come from that section, and each field's description is in its
`metadata["description"]` (the CLI's help). The classes check what the schema cannot
(`__post_init__`). This module imports neither torch nor any stage module, so settings are
built, and the workflow is parsed, without them.
"""

import copy
import math
import typing
from dataclasses import dataclass, field, fields
from importlib.resources import files

import yaml

from .errors import UserError
from .genes import GENE_SETS_DIR

SCHEMA_PATH = files(__package__) / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
SPLITS = ("train", "val", "test")


def section_schema(path: str) -> dict:
    """The schema of the config section at `path` ("model/architecture"), references followed."""
    spec = SCHEMA
    for key in path.split("/"):
        spec = spec["properties"][key]
        if "$ref" in spec:
            spec = SCHEMA["definitions"][spec["$ref"].rsplit("/", 1)[1]]
    return spec


def deprecated(spec: dict) -> bool:
    return bool(spec.get("deprecated"))


def from_schema(path: str, *, every_key: bool = True):
    """Make the decorated class a dataclass whose fields take their defaults and descriptions
    from the config section at `path`.

    A field given a default in the class is the library's own and must not be a config key;
    with `every_key`, every key of the section but the deprecated ones must be a field.
    """

    def build(cls):
        keys = section_schema(path)["properties"]
        names = typing.get_type_hints(cls)
        for name, kind in names.items():
            if name in vars(cls):
                if name in keys:
                    raise TypeError(f"{cls.__name__}.{name}: the default is the schema's")
                continue
            if name not in keys or deprecated(keys[name]):
                raise TypeError(f"{cls.__name__}.{name} is not a key of config section {path}")
            setattr(cls, name, _field(kind, keys[name]))
        missing = [k for k, spec in keys.items() if k not in names and not deprecated(spec)]
        if every_key and missing:
            raise TypeError(f"{cls.__name__} lacks the keys {missing} of config section {path}")
        cls.section = path
        return dataclass(cls)

    return build


def _field(kind, spec: dict):
    """A dataclass field with the schema's default (a tuple where the field is one)."""
    default = spec["default"]
    metadata = {"description": " ".join(spec["description"].split()), "schema": spec}
    if typing.get_origin(kind) is tuple and isinstance(default, list):
        return field(default=tuple(default), metadata=metadata)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choices(settings, name: str) -> list:
    """The values the schema allows for field `name` of a settings class or instance."""
    (spec,) = [f.metadata["schema"] for f in fields(settings) if f.name == name]
    return spec["enum"]


def check_enum(settings, name: str) -> None:
    """UserError unless field `name` of `settings` holds one of its `choices`."""
    allowed, value = choices(settings, name), getattr(settings, name)
    if value not in allowed:
        raise UserError(f"{name} must be one of {allowed}, not {value!r}")


@from_schema("demo")
class DemoSettings:
    """The embedded demo data (`data.demo.write_demo_seaad`)."""

    n_cells: int
    n_genes: int
    n_donors: int
    seed: int


@from_schema("preprocess")
class PreprocessSettings:
    """QC, gene selection, binning and the donor split (`data.preprocess`)."""

    label_column: str
    donor_column: str
    counts_layer: str
    use_qc_flag: bool
    min_genes: int
    max_mito_fraction: float
    n_hvg: int
    hvg_flavor: str
    genes_of_interest: list[str]
    min_vocab_match: float
    n_bins: int
    max_cells_per_type: int
    min_cells_per_type: int
    val_fraction: float
    test_fraction: float
    stratify_column: str
    min_test_donors: int
    chunk_size: int
    seed: int

    def __post_init__(self):
        check_enum(self, "hvg_flavor")


@from_schema("model/architecture")
class ModelSettings:
    """Architecture of a model pretrained here (post-LN like scGPT unless `pre_norm`)."""

    d_model: int
    nhead: int
    d_hid: int
    nlayers: int
    dropout: float
    pre_norm: bool
    do_mvc: bool


@from_schema("finetune")
class TrainSettings:
    """Optimisation of one training run: pretraining or fine-tuning (`model.train`)."""

    epochs: int
    lr: float
    batch_size: int
    max_seq_len: int
    warmup_fraction: float
    weight_decay: float
    grad_clip: float
    patience: int
    mask_ratio: float
    mlm_weight: float
    seed: int
    num_workers: int
    spike_cells: int
    spike_every: int
    cuda_graphs: bool

    def __post_init__(self):
        if self.spike_cells < 0 or self.spike_every < 0:
            raise UserError(
                f"spike_cells and spike_every must be >= 0 (got {self.spike_cells}, "
                f"{self.spike_every})"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.lr <= 0:
            raise UserError(
                f"training needs epochs, batch_size, patience >= 1 and lr > 0 (got epochs="
                f"{self.epochs}, batch_size={self.batch_size}, patience={self.patience}, "
                f"lr={self.lr})"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise UserError(f"warmup_fraction must be in [0, 1), not {self.warmup_fraction}")


@from_schema("probe")
class ProbeSettings:
    """Which cells to probe and the probe's thresholds (`probe_cells`, `find_super_weights`)."""

    cells_per_type: int
    splits: tuple[str, ...]
    input_ratio: float
    output_ratio: float
    weight_ratio: float
    token_ratio: float
    min_abs: float
    contribution_min: float
    max_rounds: int
    residual: bool
    n_strongest: int
    ln_z: float
    batch_size: int
    seed: int

    def __post_init__(self):
        self.splits = tuple(self.splits)
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:
            raise UserError(f"probe splits {unknown} are not among {list(SPLITS)}")
        if self.cells_per_type < 1 or self.batch_size < 1 or self.n_strongest < 0:
            raise UserError(
                f"probe needs cells_per_type, batch_size >= 1 and n_strongest >= 0 (got "
                f"{self.cells_per_type}, {self.batch_size}, {self.n_strongest})"
            )


@from_schema("ablate", every_key=False)
class ConfirmSettings:
    """Null size, decision thresholds and resampling of `confirm.confirm_super_weights`; the
    keys it shares with the `ablate` section, and `ci`, the level of the effect's CI."""

    n_null: int
    alpha: float
    min_effect: float
    band: float
    topk_fraction: float
    topk_sweep: tuple[float, ...]
    min_recovery: float
    n_boot: int
    ci: float = 0.95
    seed: int

    def __post_init__(self):
        self.topk_sweep = tuple(float(f) for f in self.topk_sweep)
        if self.n_null < 1 or self.n_boot < 1:
            raise UserError(f"n_null and n_boot must be >= 1 (got {self.n_null}, {self.n_boot})")
        if not 0 < self.alpha < 1 or not 0 < self.ci < 1:
            raise UserError(f"alpha and ci must be in (0, 1) (got {self.alpha}, {self.ci})")
        if self.band <= 1 or self.min_effect < 0:
            raise UserError(f"band must be > 1 and min_effect >= 0 (got {self.band})")
        fractions = (self.topk_fraction, *self.topk_sweep)
        if not all(0 < f < 1 for f in fractions):
            raise UserError(f"top-k fractions must be in (0, 1), got {list(fractions)}")
        if not 0 <= self.min_recovery <= 1:
            raise UserError(f"min_recovery must be in [0, 1], got {self.min_recovery}")

    def power_warning(self, n_candidates: int) -> str:
        """Why no candidate can reach alpha after correction with this null, or ''."""
        smallest = 1 / (self.n_null + 1)
        if not n_candidates or n_candidates * smallest <= self.alpha:
            return ""
        who = (
            "no candidate can reach it"
            if smallest > self.alpha
            else f"a lone significant candidate cannot reach it after Benjamini-Hochberg over "
            f"{n_candidates} candidates"
        )
        return (
            f"n_null {self.n_null} is too small for alpha {self.alpha:g}: the smallest "
            f"reachable p is 1/{self.n_null + 1} and, with {n_candidates} candidate(s), the "
            f"smallest reachable q is {min(1.0, n_candidates * smallest):.3g}, so {who}; use "
            f"n_null >= {math.ceil(n_candidates / self.alpha) - 1}"
        )


@from_schema("ablate")
class AblateSettings:
    """Cells, null, thresholds and extra tables of the pruning test (`ablate`)."""

    n_null: int
    alpha: float
    min_effect: float
    band: float
    topk_fraction: float
    topk_sweep: tuple[float, ...]
    min_recovery: float
    n_boot: int
    n_strongest: int
    split: str
    min_donors: int
    n_permutations: int
    scales: tuple[float, ...]
    strata_columns: tuple[str, ...]
    expression_trained: bool
    mask_ratio: float
    max_cells: int
    batch_size: int
    precision: str
    seed: int

    def __post_init__(self):
        check_enum(self, "precision")
        self.topk_sweep = tuple(float(f) for f in self.topk_sweep)
        self.scales = tuple(float(s) for s in self.scales)
        self.strata_columns = tuple(self.strata_columns)
        self.confirm_settings()  # checks the shared keys
        if self.n_strongest < 1 or self.min_donors < 2 or self.n_permutations < 99:
            raise UserError(
                f"ablate needs n_strongest >= 1, min_donors >= 2 and n_permutations >= 99 "
                f"(got {self.n_strongest}, {self.min_donors}, {self.n_permutations})"
            )
        if self.split not in SPLITS:
            raise UserError(f"ablate split {self.split!r} is not one of {list(SPLITS)}")
        if not self.scales or not all(math.isfinite(s) for s in self.scales):
            raise UserError(f"scales must be a non-empty list of numbers, got {self.scales}")
        if not 0 < self.mask_ratio < 1:
            raise UserError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.max_cells < 1 or self.batch_size < 1:
            raise UserError("max_cells and batch_size must be >= 1")

    def confirm_settings(self) -> ConfirmSettings:
        """The confirmation core's settings: every field of ConfirmSettings this stage has."""
        shared = [f.name for f in fields(ConfirmSettings) if hasattr(self, f.name)]
        return ConfirmSettings(**{name: getattr(self, name) for name in shared})


@from_schema("channels")
class ChannelSettings:
    """Cells, strata, null and candidates of the channel map (`channels`); `genes_of_interest`
    None is `channels.default_genes_of_interest()`."""

    splits: tuple[str, ...]
    strata_columns: tuple[str, ...]
    genes_of_interest: tuple[str, ...] | None
    n_unconfirmed: int
    n_null: int
    band: float
    min_cells: int
    max_cells: int
    batch_size: int
    n_permutations: int
    seed: int

    def __post_init__(self):
        self.splits, self.strata_columns = tuple(self.splits), tuple(self.strata_columns)
        if self.n_permutations < 99:
            raise UserError(f"n_permutations must be >= 99, got {self.n_permutations}")
        if self.genes_of_interest is not None:
            self.genes_of_interest = tuple(self.genes_of_interest)
        if self.n_unconfirmed < 0 or self.min_cells < 2:
            raise UserError(
                f"n_unconfirmed must be >= 0 and min_cells >= 2 (a gene's standard error needs "
                f"2 cells); got {self.n_unconfirmed}, {self.min_cells}"
            )
        if self.n_null < 2 or self.band <= 1:
            raise UserError(
                f"n_null must be >= 2 (a null sd) and band > 1; got {self.n_null}, {self.band}"
            )
        if self.max_cells < 1 or self.batch_size < 1:
            raise UserError("max_cells and batch_size must be >= 1")


@from_schema("genes")
class GeneEffectSettings:
    """Cells, genes, null and batching of the causal gene effects (`gene_effects`)."""

    split: str
    max_cells: int
    max_genes: int
    n_null: int
    band: float
    min_cells: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.split not in SPLITS:
            raise UserError(f"genes split must be train, val or test, not {self.split!r}")
        if self.max_cells < 1 or self.max_genes < 0 or self.batch_size < 1:
            raise UserError(
                f"max_cells and batch_size must be >= 1 and max_genes >= 0 (0 = all); got "
                f"{self.max_cells}, {self.batch_size}, {self.max_genes}"
            )
        if self.n_null < 2 or self.band <= 1 or self.min_cells < 1:
            raise UserError(
                f"n_null must be >= 2 (a null sd), band > 1 and min_cells >= 1; got "
                f"{self.n_null}, {self.band}, {self.min_cells}"
            )


@from_schema("gene_sets")
class GeneSetSettings:
    """Which gene-set libraries the enrichment loads (`enrich.load_gene_sets`); a
    `resource_dir` of None becomes the shipped folder."""

    packaged: tuple[str, ...]
    resource_dir: str | None
    gmt_files: tuple[str, ...]
    enrichr: tuple[str, ...]
    organism: str

    def __post_init__(self):
        self.packaged, self.gmt_files = tuple(self.packaged), tuple(self.gmt_files)
        self.enrichr = tuple(self.enrichr)
        if self.resource_dir is None:
            self.resource_dir = str(GENE_SETS_DIR)


@from_schema("enrich")
class EnrichSettings:
    """The enrichment tests and their calibration on null weights (`enrich`)."""

    method: str
    permutation_num: int
    min_size: int
    max_size: int
    library_min_size: dict[str, int]
    ora_top_n: int
    fdr_method: str
    fdr_threshold: float
    max_tied: float
    n_null_rankings: int
    ad_test_sets: tuple[str, ...]
    ad_test_level: float
    threads: int
    seed: int

    def __post_init__(self):
        self.ad_test_sets = tuple(self.ad_test_sets)
        if self.fdr_method not in choices(self, "fdr_method"):
            raise UserError(f"fdr_method must be bh or by, not {self.fdr_method!r}")
        if self.n_null_rankings < 0:
            raise UserError(f"n_null_rankings must be >= 0, not {self.n_null_rankings}")
        if not self.ad_test_sets:
            raise UserError("ad_test_sets must name at least one gene-set library or set")
        if not 0 < self.ad_test_level < 1:
            raise UserError(f"ad_test_level must be in (0, 1), not {self.ad_test_level}")
        if self.method not in choices(self, "method"):
            raise UserError(
                f"enrichment method must be multilevel or permutation, not {self.method!r}"
            )
        sizes = [self.min_size, *self.library_min_size.values()]
        if min(sizes) < 1 or self.max_size < max(sizes):
            raise UserError(
                f"gene-set sizes need 1 <= min_size <= max_size "
                f"(got minimum sizes {sizes}, max_size {self.max_size})"
            )
        if self.permutation_num < 1 or self.ora_top_n < 1 or self.threads < 1:
            raise UserError("permutation_num, ora_top_n and threads must be >= 1")
        if not 0 < self.fdr_threshold <= 1:
            raise UserError(f"fdr_threshold must be in (0, 1], not {self.fdr_threshold}")
        if not 0 <= self.max_tied < 1:
            raise UserError(f"max_tied must be in [0, 1), not {self.max_tied}")

    def min_size_of(self, library: str) -> int:
        return self.library_min_size.get(library, self.min_size)


@from_schema("quantize")
class QuantizeSettings:
    """The quantization grid, clipping, W8A8 and the bootstrap of the arms (`quantize`)."""

    bits: list[int]
    block_sizes: list[int | str]
    clip: str
    clip_values: list[float]
    clip_scope: str
    include_heads: bool
    w8a8: bool
    w8a8_weights: str
    activation_scale: str
    hold_out_residual: bool
    batch_size: int
    n_boot: int
    seed: int

    def __post_init__(self):
        if self.n_boot < 1:
            raise UserError(f"quantize n_boot must be >= 1, not {self.n_boot}")
        if not self.bits or any(not isinstance(b, int) or not 2 <= b <= 8 for b in self.bits):
            raise UserError(f"quantize bits must be integers from 2 to 8, not {self.bits}")
        if not self.block_sizes:
            raise UserError("quantize block_sizes is empty; give e.g. [64, 1024, 'tensor']")
        for size in self.block_sizes:
            check_block_size(size)
        if not self.clip_values:
            raise UserError("quantize clip_values is empty; give e.g. [3.0, 6.0]")
        for value in self.clip_values:
            check_clip(self.clip, value)
        for key in ("clip_scope", "w8a8_weights", "activation_scale"):
            check_choice(key, getattr(self, key), tuple(choices(self, key)))
        if self.batch_size < 1:
            raise UserError(f"quantize needs batch_size >= 1, not {self.batch_size}")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """UserError unless quantize's `key` has one of the `allowed` values."""
    if value not in allowed:
        raise UserError(f"quantize {key} must be one of {allowed}, not {value!r}")


def check_block_size(block_size) -> None:
    """UserError unless `block_size` is a positive integer or "tensor"."""
    if block_size == "tensor" or (isinstance(block_size, int) and block_size >= 1):
        return
    raise UserError(f"block size must be a positive integer or 'tensor', not {block_size!r}")


def check_clip(clip: str, clip_value: float) -> None:
    """UserError unless `clip` is a clip method and `clip_value` one of its thresholds."""
    check_choice("clip", clip, tuple(choices(QuantizeSettings, "clip")))
    if clip == "zscore" and not clip_value > 0:
        raise UserError(f"zscore clipping needs clip values > 0, not {clip_value}")
    if clip == "fraction" and not 0 < clip_value < 1:
        raise UserError(f"fraction clipping needs 0 < clip value < 1, not {clip_value}")


SECTIONS = {
    "preprocess": PreprocessSettings,
    "model/architecture": ModelSettings,
    "pretrain": TrainSettings,
    "finetune": TrainSettings,
    "probe": ProbeSettings,
    "ablate": AblateSettings,
    "channels": ChannelSettings,
    "genes": GeneEffectSettings,
    "gene_sets": GeneSetSettings,
    "enrich": EnrichSettings,
    "quantize": QuantizeSettings,
}
"""The settings class of each config section that configures a library stage."""


@from_schema("positive_control")
class ControlSettings:
    """The spike-in positive control (`superweights.control`): whether it runs, its gene
    set's choice and its planting. `max_seq_len` and `batch_size` are not config keys: the
    workflow passes fine-tuning's, so that the control is tokenised as the user's model."""

    enabled: bool
    seed: int
    max_train_cells: int
    min_genes: int
    max_genes: int
    min_detection: float
    max_set_size: int
    min_coverage: float
    min_type_eta2: float
    gain: float
    input_ratio: float
    spike_scale: float
    sink_logit: float
    sink_bias: float
    min_sink_z: float
    sinks: bool
    layers: tuple[int, ...]
    calibration_cells: int
    max_seq_len: int = 128
    batch_size: int = 64

    def __post_init__(self):
        self.layers = tuple(int(layer) for layer in self.layers)
        if not 1 <= self.min_genes <= self.max_genes:
            raise UserError(
                f"positive_control needs 1 <= min_genes <= max_genes (got {self.min_genes}, "
                f"{self.max_genes})"
            )
        for name in ("min_detection", "min_coverage", "min_type_eta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(
                    f"positive_control {name} must be in [0, 1], got {getattr(self, name)}"
                )
        positive = ("gain", "input_ratio", "spike_scale", "sink_logit", "min_sink_z")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) <= 0]
        if self.sink_bias < 0:
            bad.append(f"sink_bias={self.sink_bias} (>= 0)")
        if bad:
            raise UserError(f"positive_control settings must be > 0: {', '.join(bad)}")
        if self.calibration_cells < 8 or self.max_seq_len < 2 or self.batch_size < 1:
            raise UserError(
                "positive_control needs calibration_cells >= 8, max_seq_len >= 2 and "
                "batch_size >= 1"
            )
