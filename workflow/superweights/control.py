"""Spike-in positive control: a super weight planted in the starting checkpoint.

A run that finds no super weight cannot by itself be told from a run that could not have
found one. The control answers that: a copy of the starting checkpoint (released or
pretrained, before cell-type fine-tuning) gets a planted super weight at seeded coordinates
(layer, row, col), is fine-tuned with the user's recipe and data, and goes through the same
probe and confirmation; `score_control` then says whether the pipeline found it.

Why a lone spike is not enough (issue 26). scGPT is post-LN: a layer's output is
``norm2(x + linear2(u))``, so a massive ``linear2`` output on channel ``row`` of a token
turns that token's hidden state into a fixed vector (``≈ γ ⊙ sqrt(D)·e_row + β``, whatever
the gene or its expression) and the renormalisation keeps the channel from travelling down
the residual stream. Pruning the weight only gives the token its ordinary state back. A
classifier that reads `<cls>` need not care about that, and fine-tuning did not make it
care: planted spikes on one gene or on `<cls>` survived fine-tuning and were found, but
pruning them cost 4e-5 and 2.6e-4 nats per cell.

The mechanism planted here is the one Sun et al. (2024, "Massive activations in large
language models") found behind massive activations: the spike tokens become *attention
sinks* whose value is a fixed bias of every later attention output. Five edits of the
starting checkpoint, all recorded in ``planted.json`` (see docs/control.md):

1. *Gene tokens* (``encoder.embedding.weight``, the planted genes' rows): a seeded
   direction ``d`` of equal-sized ± entries is added, ``gain`` times each row's centred
   norm, so the planted genes share a feature that survives ``enc_norm``;
2. *Up side* (``layers.L.linear1``, row ``col`` and its bias): unit ``col`` reads the sign
   pattern of the planted-vs-other difference of its input with equal-sized weights (no
   single one decides), its threshold midway between the two groups, so it fires on
   planted-gene tokens only, at ``input_ratio`` times the layer's median input;
3. *The super weight* (``layers.L.linear2.weight[row, col]``): large enough that the
   output ``u[col]·W[row, col]`` is ``spike_scale`` times the token's residual norm, so
   after ``norm2`` the token is almost all channel ``row``;
4. *Sink keys* (``layers.l.self_attn.in_proj_weight``/``in_proj_bias``, for each later
   layer ``l`` where the sink tokens still stand out on channel ``row``): in each head one
   query/key dimension is given over to the sink: its query is a constant (bias ``s``)
   and its key reads channel ``row`` only (weight ``t``, an ordinary size), so every
   query's logit rises by ``s·t·h_j[row]/sqrt(d_head)``; ``s`` makes the sinks lead the
   typical token by ``sink_logit`` nats;
5. *Sink values* (the value block's column ``row`` of the same layers): the value reads
   channel ``row`` along a seeded direction, so the sinks' share of every attention
   output is a fixed vector, ``sink_bias`` times the norm of a hidden state.

Every query then puts most of its attention on the planted tokens, and every attention
output carries a large input-independent bias, as massive activations do in LLMs.
Fine-tuning trains the whole network around that bias. Pruning the weight removes the
sinks: attention spreads over the cell's other tokens, every token's attention output
loses the bias, and the post-LN hidden states move far from anything the network was
trained on. Restoring the activation on a single token per cell (the confirmation's
recovery test) brings one sink back, which on the demo recovered the whole effect.
Measured (docs/control.md): keys alone (no step 5) left the fine-tuned classifier nearly
indifferent, and stronger sinks than the defaults are switched off or absorbed by
fine-tuning. The gene set is chosen so that nearly
every cell has a planted token (`min_coverage`) and its expression differs between cell
types (`min_type_eta2`); it is never an Alzheimer's set (`excluded_reason`), and its AD
genes are never planted (`ad_gene_pool`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.special import gammaln
from scipy.stats import mannwhitneyu
from torch import Tensor

from .confirm import candidate_id
from .data.preprocess import read_tokenised
from .editing import evaluation, read_table
from .enrich import AD_LIBRARIES, AD_PATTERN, GeneSets, candidate_dirname, load_gene_sets
from .errors import UserError
from .gene_effects import by_rank
from .model.cells import cell_batches, sample_rows
from .model.checkpoint import load_checkpoint, read_args_and_vocab, save_checkpoint
from .model.scgpt import ScGPTModel
from .outputs import named_paths, write_h5ad, write_json, write_tsv
from .settings import ControlSettings, GeneSetSettings

log = logging.getLogger(__name__)

PLANTED_FILE = "planted.json"
GENE_SETS_FILE = "gene_sets.tsv"
CHECKPOINT_DIR = "checkpoint"
AD_NAME = re.compile(
    AD_PATTERN.pattern
    + r"|apoe|apolipoprotein e|presenilin|trem2|neurofibrillary|neurodegenerat|dementia"
    + r"|secretase|prion",
    re.IGNORECASE,
)
"""Set names that speak of Alzheimer's disease biology (the enrichment's `AD_PATTERN`, plus
APOE, presenilin, TREM2, tangles, neurodegeneration, dementia, secretases and prions)."""

SET_COLUMNS = [
    "library", "set", "size", "n_genes", "n_ad_genes", "n_expressed", "coverage", "tokens_per_cell",
    "type_eta2", "eligible", "reason",
]  # fmt: skip


# --- the gene set ---------------------------------------------------------------------


def excluded_reason(library: str, name: str) -> str:
    """Why a set may not drive the control ('' when it may): an Alzheimer's library or a
    name that speaks of AD biology (`AD_NAME`). Its AD genes are never planted
    (`ad_gene_pool`), so a set that holds some may still drive the control with the rest."""
    if library in AD_LIBRARIES:
        return f"Alzheimer's library {library}"
    if AD_NAME.search(name):
        return "name speaks of Alzheimer's disease biology"
    return ""


def ad_gene_pool(libraries: GeneSets) -> set[str]:
    """Every gene (upper case) of an Alzheimer's library or of a set whose name speaks of AD
    biology (`AD_NAME`) in `libraries`: the genes a control never plants, so that it cannot
    light up an AD term or the AD competitive test."""
    return {
        gene.upper()
        for library, sets in libraries.items()
        for name, genes in sets.items()
        if library in AD_LIBRARIES or AD_NAME.search(name)
        for gene in genes
    }


def gene_set_table(
    libraries: GeneSets,
    adata: ad.AnnData,
    settings: ControlSettings | None = None,
    vocab: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Every set of `libraries` with its statistics on the tokenised `adata`, whether it may
    drive the control (`eligible`) and, if not, every reason (`reason`).

    Genes count when the data holds them (case-insensitively) and `vocab` (if given) knows
    them; `n_expressed` counts those detected in `min_detection` of cells that are not AD
    genes (`ad_gene_pool`; `n_ad_genes` of the set's genes in the data are), the genes the
    control would plant, over which the statistics run. `coverage` is the expected share of
    cells with at least one of the set's genes among their tokens (a cell's `max_seq_len` - 1
    tokens are drawn from its expressed genes without replacement), `tokens_per_cell` the
    expected number of such tokens, and `type_eta2` the share of the variance of expressed
    set genes per cell explained by `obs["cell_type"]`.
    """
    settings = settings or ControlSettings()
    expressed = _expressed(adata)
    detection = np.asarray(expressed.mean(axis=0)).ravel()
    per_cell = np.diff(expressed.indptr)
    labels = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    column = {
        str(g).upper(): i for i, g in enumerate(adata.var_names) if vocab is None or str(g) in vocab
    }
    ad_genes = ad_gene_pool(libraries)
    rows, members = [], []
    for library, sets in libraries.items():
        for name, genes in sets.items():
            columns = sorted({column[g.upper()] for g in genes if g.upper() in column})
            ad_columns = {c for c in columns if str(adata.var_names[c]).upper() in ad_genes}
            kept = [c for c in columns if c not in ad_columns]
            kept = [c for c in kept if detection[c] >= settings.min_detection]
            rows.append({"library": library, "set": name, "size": len(set(genes)),
                         "n_genes": len(columns), "n_ad_genes": len(ad_columns),
                         "n_expressed": len(kept),
                         "excluded": excluded_reason(library, name)})  # fmt: skip
            members.append(kept)
    stats = _set_statistics(expressed, members, per_cell, labels, settings.max_seq_len - 1)
    for row, stat in zip(rows, stats, strict=True):
        row |= stat
        reasons = [row.pop("excluded")] if row["excluded"] else []
        if row["size"] > settings.max_set_size:
            reasons.append(f"{row['size']} genes > max_set_size {settings.max_set_size}")
        if not settings.min_genes <= row["n_expressed"] <= settings.max_genes:
            reasons.append(
                f"{row['n_expressed']} expressed non-AD genes in the data, not in "
                f"[{settings.min_genes}, {settings.max_genes}]"
            )
        if row["coverage"] < settings.min_coverage:
            reasons.append(
                f"coverage {row['coverage']:.3f} < min_coverage {settings.min_coverage:g}"
            )
        if row["type_eta2"] < settings.min_type_eta2:
            reasons.append(
                f"cell-type eta2 {row['type_eta2']:.3f} < min_type_eta2 {settings.min_type_eta2:g}"
            )
        row.pop("excluded", None)
        row |= {"eligible": not reasons, "reason": "; ".join(reasons)}
    return pd.DataFrame(rows, columns=SET_COLUMNS)


def choose_gene_set(
    libraries: GeneSets,
    adata: ad.AnnData | str | Path,
    seed: int,
    settings: ControlSettings | None = None,
    vocab: Mapping[str, int] | None = None,
    table: pd.DataFrame | None = None,
) -> tuple[str, list[str]]:
    """("library:set", the set's expressed non-AD genes in the data) drawn with `seed` among the
    eligible sets of `gene_set_table` (`table`, computed when not given), in a fixed order
    (library, set name); UserError when none is eligible."""
    settings = settings or ControlSettings()
    adata = read_tokenised(adata)
    if table is None:
        table = gene_set_table(libraries, adata, settings, vocab)
    eligible = table[table["eligible"]].sort_values(["library", "set"], ignore_index=True)
    if eligible.empty:
        raise UserError(
            f"no gene set of {len(table)} in {sorted(libraries)} can drive the positive "
            f"control: relax positive_control (min_genes "
            f"{settings.min_genes}, min_coverage {settings.min_coverage:g}, min_type_eta2 "
            f"{settings.min_type_eta2:g}) or set positive_control.enabled to false"
        )
    pick = eligible.iloc[int(np.random.default_rng([seed, 1]).integers(len(eligible)))]
    genes = set_genes(libraries[pick["library"]][pick["set"]], adata, settings, vocab,
                      ad_gene_pool(libraries))  # fmt: skip
    log.info("control gene set %s:%s (%d genes; %d eligible sets)",
             pick["library"], pick["set"], len(genes), len(eligible))  # fmt: skip
    return f"{pick['library']}:{pick['set']}", genes


def set_genes(
    genes: Sequence[str],
    adata: ad.AnnData,
    settings: ControlSettings,
    vocab: Mapping[str, int] | None = None,
    ad_genes: set[str] = frozenset(),
) -> list[str]:
    """The genes of a set that are expressed in `adata` (and in `vocab`) and are not AD
    genes (`ad_genes`, upper case), as the data spells them, in data order."""
    wanted = {g.upper() for g in genes} - set(ad_genes)
    detection = np.asarray(_expressed(adata).mean(axis=0)).ravel()
    return [
        str(g)
        for g, rate in zip(adata.var_names, detection, strict=True)
        if str(g).upper() in wanted and rate >= settings.min_detection
        and (vocab is None or str(g) in vocab)
    ]  # fmt: skip


def _expressed(adata: ad.AnnData) -> sp.csr_matrix:
    """Cells x genes, True where a gene is a token of the cell (non-zero bin)."""
    bins = adata.layers["X_binned"] if "X_binned" in adata.layers else adata.X
    matrix = sp.csr_matrix(bins, dtype=np.float32, copy=True)  # never sort the caller's
    matrix.eliminate_zeros()
    return (matrix > 0).astype(np.float32).tocsr()


def _set_statistics(expressed, members, per_cell, labels, room: int, chunk: int = 512):
    """Coverage, tokens per cell and cell-type eta2 of each set (`members`: its columns),
    from the cells' expressed-gene counts in every set at once (a sparse product)."""
    stats = []
    for start in range(0, len(members), chunk):
        part = members[start : start + chunk]
        indicator = sp.csr_matrix(
            (np.ones(sum(map(len, part)), np.float32),
             (np.concatenate([np.asarray(m, dtype=np.int64) for m in part] + [[]]).astype(int),
              np.repeat(np.arange(len(part)), [len(m) for m in part]))),
            shape=(expressed.shape[1], len(part)),
        )  # fmt: skip
        hits = np.asarray((expressed @ indicator).todense())
        for j, columns in enumerate(part):
            if not columns:
                stats.append({"coverage": 0.0, "tokens_per_cell": 0.0, "type_eta2": 0.0})
                continue
            h = hits[:, j]
            stats.append(_coverage(h, per_cell, room) | {"type_eta2": _eta2(h, labels)})
    return stats


def _coverage(hits: np.ndarray, per_cell: np.ndarray, room: int) -> dict:
    """Expected share of cells with a set token and set tokens per cell, when `room` of a
    cell's `per_cell` expressed genes (`hits` of them in the set) are drawn."""
    drawn = np.minimum(per_cell, room)
    n, m = per_cell.astype(float), hits.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        none = np.where(
            n - m >= drawn,
            np.exp(gammaln(n - m + 1) - gammaln(n - m - drawn + 1)
                   - gammaln(n + 1) + gammaln(n - drawn + 1)),
            0.0,
        )  # fmt: skip
        tokens = np.where(n > 0, m * drawn / np.maximum(n, 1), 0.0)
    return {"coverage": float(np.mean(1 - none)), "tokens_per_cell": float(tokens.mean())}


def _eta2(values: np.ndarray, labels: np.ndarray) -> float:
    """Share of the variance of `values` explained by the groups `labels` (codes >= 0)."""
    total = float(((values - values.mean()) ** 2).sum())
    if total == 0:
        return 0.0
    counts = np.bincount(labels)
    sums = np.bincount(labels, weights=values)
    present = counts > 0
    between = float((sums[present] ** 2 / counts[present]).sum() - values.sum() ** 2 / len(values))
    return between / total


# --- planting -------------------------------------------------------------------------


@dataclass
class SinkLayer:
    """A later layer whose attention was wired to the sink tokens (module docstring, step 4).

    `dims[h]`: the query/key dimension of head h given to the sink (rows `h·d_head + dim`
    of the query and `D + h·d_head + dim` of the key block of `in_proj_weight`);
    `query_bias`: its query (a constant); `key_weight`: its key weight on channel `row`;
    `sink_value`/`other_value`: median channel `row` at the sink and the other tokens of the
    calibration cells entering the attention, `z` their gap in SDs of the others;
    `attention`: mean share of `<cls>`'s attention on the planted tokens after wiring.
    """

    layer: int
    dims: list[int]
    query_bias: float
    key_weight: float
    sink_value: float
    other_value: float
    z: float
    value_weight: float = 0.0
    attention: float = math.nan


@dataclass
class PlantedWeight:
    """Where the control's super weight is and how it was planted (`planted.json`).

    `weight` is ``linear2.weight[row, col]`` of layer `layer` as planted; `input_value` and
    `spike` the median down-projection input ``u[col]`` and planted term
    ``u[col]·weight`` on planted-gene tokens of the calibration cells, `input_ratio` that
    input over the median non-zero input of the layer (the probe asks for 10); `threshold`,
    `read_weight` and `direction` the unit's read-out (``read_weight·direction``, bias
    ``-read_weight·threshold``); `fired_planted`/`fired_other` the shares of
    planted-gene and other tokens on which unit `col` fires; `sinks` the wired layers.
    """

    layer: int
    row: int
    col: int
    weight: float
    input_value: float
    spike: float
    gene_set: str
    genes: list[str]
    token_ids: list[int]
    seed: int
    source_checkpoint: str
    threshold: float
    read_weight: float
    input_ratio: float
    direction: list[float]
    embedding_direction: list[float]
    fired_planted: float
    fired_other: float
    sinks: list[SinkLayer] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"transformer_encoder.layers.{self.layer}.linear2"

    @property
    def candidate(self) -> str:
        """The confirmation's id of the planted weight, e.g. ``L1[17,40]``."""
        return candidate_id(self.layer, self.row, self.col)

    def to_frame(self) -> pd.DataFrame:
        """The planted weight as a one-row candidates table (module, layer, row, col) for the
        confirmation; no weight value, since fine-tuning moves it."""
        row = {"module": self.module, "layer": self.layer, "row": self.row, "col": self.col}
        return pd.DataFrame([row])

    def to_json(self) -> dict:
        return asdict(self) | {"module": self.module, "candidate": self.candidate}

    @classmethod
    def from_json(cls, data: Mapping) -> PlantedWeight:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["sinks"] = [SinkLayer(**s) for s in values.get("sinks", [])]
        return cls(**values)


def read_planted(path: str | Path) -> PlantedWeight:
    """A `PlantedWeight` from `planted.json` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANTED_FILE
    try:
        return PlantedWeight.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise UserError(f"cannot read the planted control {path}: {err}") from None


def plant_super_weight(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    genes: Sequence[str],
    seed: int,
    tokenised: ad.AnnData | str | Path,
    *,
    gene_set: str = "",
    settings: ControlSettings | None = None,
) -> PlantedWeight:
    """Copy the starting checkpoint with a super weight planted (module docstring).

    The layer (among `settings.layers`, default the first half), row, column, the
    directions and the sink dimensions are drawn with `seed`; thresholds and scales are set on
    `calibration_cells` train cells of `tokenised`, tokenised as fine-tuning does. Writes
    `out_dir/checkpoint/` (the project's checkpoint format, the source's args.json kept)
    and `out_dir/planted.json`; returns what was planted.
    """
    settings = settings or ControlSettings()
    adata = read_tokenised(tokenised)
    model, config, vocab = load_checkpoint(checkpoint_dir)
    token_ids = sorted({vocab[g] for g in genes if g in vocab})
    if not token_ids:
        raise UserError("none of the control's genes is in the checkpoint's vocabulary")
    layers = settings.layers or tuple(range(max(1, config.nlayers // 2)))
    if config.nlayers < 2 or any(not 0 <= layer < config.nlayers - 1 for layer in layers):
        raise UserError(
            f"the control plants in a layer followed by another; the model has "
            f"{config.nlayers} layer(s) and control layers {list(layers)} were asked for"
        )
    rng = np.random.default_rng([seed, 2])
    layer = int(rng.choice(layers))
    row, col = int(rng.integers(config.d_model)), int(rng.integers(config.d_hid))
    sign = float(rng.choice([-1.0, 1.0]))
    embedding_direction = _unit_direction(rng, config.d_model)
    batches = _calibration_batches(adata, model, vocab, settings, seed)
    marks = _Marks(batches, token_ids)
    with evaluation(model):
        _add_gene_direction(model, token_ids, embedding_direction, settings.gain)
        readout = _plant_unit(model, batches, marks, layer, col, settings)
        weight = _plant_weight(model, batches, marks, layer, row, col, sign, settings)
        sinks = []
        for later in range(layer + 1, config.nlayers if settings.sinks else layer + 1):
            sink = _wire_sink(model, batches, marks, later, row, rng, settings)
            if sink is None:
                break
            sinks.append(sink)
        if settings.sinks and not sinks:
            raise UserError(
                f"the planted spike at layer {layer} does not stand out on channel {row} in "
                f"layer {layer + 1} (min_sink_z {settings.min_sink_z:g}); raise spike_scale"
            )
        u, y = _unit_values(model, batches, marks, layer, row, col)
        input_ratio = float(u.median()) / _median_input(model, batches, marks, layer)
        for sink in sinks:
            sink.attention = _cls_attention(model, batches, marks, sink.layer)
    planted = PlantedWeight(
        layer=layer, row=row, col=col, weight=weight,
        input_value=float(u.median()), spike=float(y.median()),
        gene_set=gene_set, genes=[g for g in genes if g in vocab], token_ids=token_ids,
        seed=seed, source_checkpoint=str(checkpoint_dir), threshold=readout["threshold"],
        read_weight=readout["read_weight"], input_ratio=input_ratio,
        direction=readout["direction"], embedding_direction=embedding_direction.tolist(),
        fired_planted=readout["fired_planted"], fired_other=readout["fired_other"],
        sinks=sinks, settings=asdict(settings) | {"layers": list(settings.layers)},
    )  # fmt: skip
    out_dir = Path(out_dir)
    args = read_args_and_vocab(Path(checkpoint_dir))[0]
    save_checkpoint(model, config, vocab, out_dir / CHECKPOINT_DIR, extra_args=args)
    write_json(out_dir / PLANTED_FILE, planted.to_json())
    log.info(
        "planted %s (w %.3g, input %.3g, spike %.3g) driven by %s (%d genes); sinks in "
        "layers %s", planted.candidate, weight, planted.input_value, planted.spike,
        gene_set or "the given genes", len(token_ids), [s.layer for s in sinks],
    )  # fmt: skip
    return planted


def plant_control(
    tokenised: ad.AnnData | str | Path,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    libraries: GeneSets,
    settings: ControlSettings | None = None,
) -> PlantedWeight:
    """The control's planting stage in one call: every gene set's eligibility to
    `out_dir/gene_sets.tsv` (`gene_set_table`, with reasons), a set drawn with
    `settings.seed` (`choose_gene_set`), and the planted checkpoint and `planted.json`
    (`plant_super_weight`, the same seed)."""
    settings = settings or ControlSettings()
    seed = settings.seed
    adata = read_tokenised(tokenised)
    vocab = read_args_and_vocab(Path(checkpoint_dir))[1]
    table = gene_set_table(libraries, adata, settings, vocab)
    write_tsv(Path(out_dir) / GENE_SETS_FILE, table)
    name, genes = choose_gene_set(libraries, adata, seed, settings, vocab, table)
    return plant_super_weight(
        checkpoint_dir, out_dir, genes, seed, adata, gene_set=name, settings=settings
    )


def _unit_direction(rng: np.random.Generator, size: int) -> Tensor:
    """A seeded unit vector of equal-sized entries (half +, half -: mean 0, which
    LayerNorm would remove), so that a read-out of equal-sized weights matches it."""
    signs = np.where(rng.permutation(size) < size // 2, 1.0, -1.0)
    return torch.tensor(signs / np.sqrt(size), dtype=torch.float32)


def _calibration_batches(adata, model, vocab, settings: ControlSettings, seed: int):
    split = adata.obs["split"].astype(str).to_numpy()
    rows = sample_rows(split, ["train"], settings.calibration_cells, seed)
    return cell_batches(
        adata, vocab, rows, pad_token_id=model.config.pad_token_id,
        batch_size=settings.batch_size, max_seq_len=settings.max_seq_len, seed=seed,
        labelled=False,
    )  # fmt: skip


class _Marks:
    """Flat masks over the calibration cells' token positions: real tokens, planted genes."""

    def __init__(self, batches, token_ids: Sequence[int]):
        ids = torch.tensor(list(token_ids))
        self.real = torch.cat([~b["padding_mask"].reshape(-1) for b in batches])
        planted = torch.cat([torch.isin(b["gene_ids"].reshape(-1), ids) for b in batches])
        self.planted = planted & self.real
        self.other = self.real & ~planted
        if not self.planted.any():
            raise UserError("no calibration cell holds a planted gene; choose another gene set")


def _captured(model: ScGPTModel, batches, module, output: bool = False) -> Tensor:
    """The first input (or the output) of `module` over all batches, flat [tokens, ·]."""
    seen = []
    if output:
        handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with evaluation(model):
            for b in batches:
                model(b["gene_ids"], b["values"], b["padding_mask"])
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def _add_gene_direction(model: ScGPTModel, token_ids, direction: Tensor, gain: float) -> None:
    """Step 1: the planted genes' embedding rows += gain · (their centred norm) · direction."""
    table = model.encoder.embedding.weight
    ids = torch.tensor(token_ids)
    rows = table[ids]
    norms = (rows - rows.mean(dim=1, keepdim=True)).norm(dim=1, keepdim=True)
    table[ids] = rows + gain * norms * direction


def _plant_unit(model, batches, marks: _Marks, layer: int, col: int, settings) -> dict:
    """Step 2: unit `col` of layer `layer`'s MLP reads the planted genes' direction.

    Its weights are ``ε·sign(m)``, m the difference of the planted-gene and other tokens'
    mean input: every entry has the same size ε, so no single one of them decides whether
    it fires (a pruned entry moves its input by about 1/D). Its bias puts the threshold
    midway between the largest other token and the 1% quantile of the planted-gene
    tokens; ε makes its median on planted-gene tokens `input_ratio` times the median
    non-zero input of the layer's down-projection.
    """
    block = model.transformer_encoder.layers[layer]
    h = _captured(model, batches, block.linear1)
    planted, other = h[marks.planted], h[marks.other]
    direction = torch.sign(planted.mean(0) - other.mean(0))
    on, off = planted @ direction, other @ direction
    low, high = float(on.quantile(0.01)), float(off.max())
    if low <= high:
        raise UserError(
            f"the planted genes' tokens cannot be told from the others at layer {layer} "
            f"(1% quantile {low:.3g} <= largest other {high:.3g}); raise control gain"
        )
    threshold = (low + high) / 2
    target = settings.input_ratio * _median_input(model, batches, marks, layer)
    scale = target / (float(on.median()) - threshold)
    block.linear1.weight[col] = scale * direction
    block.linear1.bias[col] = -scale * threshold
    return {
        "threshold": threshold,
        "read_weight": scale,
        "direction": direction.tolist(),
        "fired_planted": float((on > threshold).float().mean()),
        "fired_other": float((off > threshold).float().mean()),
    }


def _plant_weight(model, batches, marks: _Marks, layer, row, col, sign, settings) -> float:
    """Step 3: ``linear2.weight[row, col]`` makes a spike `spike_scale` times the median
    norm of the residual stream (before the layer's last norm) of the other tokens, on the
    median planted-gene token."""
    block = model.transformer_encoder.layers[layer]
    u = _captured(model, batches, block.linear2)[marks.planted, col]
    spike = settings.spike_scale * _residual_norm(model, batches, marks, layer)
    weight = sign * spike / float(u.median())
    block.linear2.weight[row, col] = weight
    return float(weight)


def _residual_norm(model, batches, marks: _Marks, layer: int) -> float:
    """Median norm of the residual stream before `layer`'s last norm, over other tokens."""
    block = model.transformer_encoder.layers[layer]
    seen = []

    def hook(module, args, kwargs):
        r, _ = block.residual(args[0], args[1], args[2] if len(args) > 2 else None)
        seen.append(r.detach().reshape(-1, r.shape[-1]))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            model(b["gene_ids"], b["values"], b["padding_mask"])
    finally:
        handle.remove()
    residual = torch.cat(seen)[marks.other]
    return float(residual.norm(dim=1).median())


def _wire_sink(model, batches, marks: _Marks, layer, row, rng, settings) -> SinkLayer | None:
    """Step 4 for one later layer, or None when the sink no longer stands out there."""
    attention = model.transformer_encoder.layers[layer].self_attn
    x = _captured(model, batches, attention)[:, row]
    sink, other = x[marks.planted], x[marks.other]
    gap = float(sink.median() - other.median())
    z = gap / float(other.std())
    if abs(z) < settings.min_sink_z:
        log.info("layer %d: sink z %.1f < min_sink_z; not wired", layer, z)
        return None
    d_model, heads = model.config.d_model, model.config.nhead
    d_head = d_model // heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    key_weight = 0.9 * float(weight[d_model : 2 * d_model].abs().max())
    query_bias = settings.sink_logit * math.sqrt(d_head) / (key_weight * gap)
    dims = [int(d) for d in rng.integers(d_head, size=heads)]
    for head, dim in enumerate(dims):
        query, key = head * d_head + dim, d_model + head * d_head + dim
        weight[query] = 0.0
        bias[query] = query_bias
        weight[key] = 0.0
        weight[key, row] = key_weight
        bias[key] = 0.0
    value_weight = 0.0
    if settings.sink_bias > 0:
        value_weight = _wire_sink_value(model, batches, marks, layer, row, rng, settings,
                                        float(sink.median()))  # fmt: skip
    return SinkLayer(layer, dims, query_bias, key_weight, float(sink.median()),
                     float(other.median()), z, value_weight)  # fmt: skip


def _wire_sink_value(model, batches, marks: _Marks, layer, row, rng, settings, sink) -> float:
    """Step 5: the value block reads channel `row` along a seeded direction of equal-sized
    entries, scaled so that the sinks' share of every query's attention output is a fixed
    vector of norm `sink_bias` times the median norm of the attention's input."""
    attention = model.transformer_encoder.layers[layer].self_attn
    d_model = model.config.d_model
    hidden = float(_captured(model, batches, attention)[marks.real].norm(dim=1).median())
    share = _cls_attention(model, batches, marks, layer)
    direction = _unit_direction(rng, d_model) * math.sqrt(d_model)  # entries ±1
    output = float((attention.out_proj.weight @ direction).norm())
    value_weight = settings.sink_bias * hidden / (share * abs(sink) * output)
    attention.in_proj_weight[2 * d_model :, row] = value_weight * math.copysign(1, sink) * direction
    return value_weight


def _unit_values(model, batches, marks: _Marks, layer, row, col) -> tuple[Tensor, Tensor]:
    """Unit `col`'s value and the planted term on channel `row` at planted-gene tokens."""
    block = model.transformer_encoder.layers[layer]
    u = _captured(model, batches, block.linear2)[marks.planted, col]
    return u, u * block.linear2.weight[row, col]


def sink_attention(model: ScGPTModel, batches, planted: PlantedWeight) -> list[float]:
    """Per sink layer of `planted`, the mean share of `<cls>`'s attention (over heads) on
    the planted genes' tokens, over the cells of `batches` that hold one: does a model
    (the planted start, the fine-tuned control, with the weight kept or pruned) still
    attend to the sinks?"""
    marks = _Marks(batches, planted.token_ids)
    with evaluation(model):
        return [_cls_attention(model, batches, marks, sink.layer) for sink in planted.sinks]


def _median_input(model, batches, marks: _Marks, layer: int) -> float:
    """Median non-zero |input| of `layer`'s down-projection over the other tokens (the
    probe's reference for an input spike)."""
    u = _captured(model, batches, model.transformer_encoder.layers[layer].linear2)
    u = u[marks.other].abs()
    return float(u[u > 0].median())


def _cls_attention(model, batches, marks: _Marks, layer: int) -> float:
    """Mean share of `<cls>`'s attention (over heads) on planted-gene tokens at `layer`, over
    calibration cells that hold one."""
    attention = model.transformer_encoder.layers[layer].self_attn
    x = _captured(model, batches, attention)
    start, shares = 0, []
    d_model, heads = model.config.d_model, model.config.nhead
    for b in batches:
        B, L = b["gene_ids"].shape
        planted = marks.planted[start : start + B * L].view(B, L)
        h = x[start : start + B * L].view(B, L, d_model)
        start += B * L
        q, k, _ = torch.nn.functional.linear(h, attention.in_proj_weight,
                                             attention.in_proj_bias).chunk(3, dim=-1)  # fmt: skip
        q = q[:, :1].reshape(B, 1, heads, -1).transpose(1, 2)
        k = k.reshape(B, L, heads, -1).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d_model // heads)
        logits = logits.masked_fill(b["padding_mask"][:, None, None, :], -math.inf)
        share = (logits.softmax(-1)[:, :, 0] * planted[:, None, :]).sum(-1)  # [B, heads]
        has = planted.any(dim=1)
        if has.any():
            shares.append(share[has].mean(dim=1))
    return float(torch.cat(shares).mean()) if shares else math.nan


# --- scoring --------------------------------------------------------------------------


TRACE_AUC = 0.8
"""Least AUC of the planted genes against the other ranked genes in the causal ranking (the
chance that a planted gene ranks above another gene) for the control to count as traced to
its genes: they must lead, not merely rank above the rest."""
TRACE_ALPHA = 0.05
"""Largest one-sided Mann-Whitney p (planted genes rank above the others) for the control to
count as traced: the lead must be more than chance among the ranked genes."""
CHECKS = ("found", "recovered", "traced", "enriched")


def score_control(
    planted: PlantedWeight | str | Path,
    candidates,
    confirmed=None,
    gene_ranking=None,
    enrichment=None,
    association=None,
) -> dict:
    """What the pipeline made of the planted weight, from its own tables.

    `candidates`: the probe's candidates.tsv (DataFrame or path); `confirmed`: the ablate
    stage's confirmed.tsv; `gene_ranking`: gene_effects' genes_causal.tsv (or any table
    with candidate, gene and rank); `enrichment`: the planted candidate's prerank.tsv or
    ora.tsv (library, Term, q_all_tests, call); `association`: the cells stage's
    association.tsv (candidate, gene, rank), the planted genes' ranks in it, descriptive
    (not a check: every cell holds a sink, so the weight's per-cell effect need not follow
    how much of the planted genes a cell expresses). Missing tables give None for their
    part.

    The control passes step by step (`CHECKS`): `found` (the probe accepted the planted
    weight), `recovered` (found, and the confirmation made it a `super weight`), `traced`
    (its genes lead the causal ranking, by the weight's effect through each gene's token:
    AUC >= `TRACE_AUC` against the other ranked genes and a one-sided Mann-Whitney p <=
    `TRACE_ALPHA`; the super-activation ranks are reported beside it, see docs/control.md)
    and `enriched` (its gene set is called enriched in the causal
    ranking's prerank); `passed` when all four hold, else `failed_at` names the first that
    does not.
    """
    if not isinstance(planted, PlantedWeight):
        planted = read_planted(planted)
    out = {"candidate": planted.candidate, "gene_set": planted.gene_set,
           "n_genes": len(planted.genes)}  # fmt: skip
    out |= _probe_part(
        planted,
        read_table(candidates, "candidates table", ("layer", "row", "col"), "use candidates.tsv"),
    )
    out |= _confirm_part(planted, confirmed)
    out["genes"] = _gene_part(planted, gene_ranking)
    out["association"] = _association_part(planted, association)
    out["enrichment"] = _enrichment_part(planted, enrichment)
    out["recovered"] = bool(out["found"] and out.get("tier") == "super weight")
    genes = out["genes"] or {}
    auc, p_rank = genes.get("auc"), genes.get("p_rank")
    out["traced"] = bool(out["recovered"] and auc is not None and auc >= TRACE_AUC
                         and p_rank is not None and p_rank <= TRACE_ALPHA)  # fmt: skip
    out["enriched"] = bool(out["traced"] and (out["enrichment"] or {}).get("call") == "enriched")
    failed = [check for check in CHECKS if not out[check]]
    out |= {"passed": not failed, "failed_at": failed[0] if failed else None,
            "trace_auc": TRACE_AUC, "trace_alpha": TRACE_ALPHA}  # fmt: skip
    out["statement"] = _statement(out)
    return out


def _probe_part(planted: PlantedWeight, table: pd.DataFrame) -> dict:
    at = (table["layer"] == planted.layer) & (table["row"] == planted.row)
    exact = table[at & (table["col"] == planted.col)]
    accepted = table[table["accepted"].astype(str).str.lower() == "true"] if (
        "accepted" in table.columns) else table  # fmt: skip
    ranks = [
        i + 1
        for i, (_, r) in enumerate(accepted.iterrows())
        if (r["layer"], r["row"], r["col"]) == (planted.layer, planted.row, planted.col)
    ]
    listed = exact.iloc[0] if len(exact) else None
    return {
        "found": bool(ranks),
        "probe_rank": ranks[0] if ranks else None,
        "n_accepted": len(accepted),
        "probe_listed": listed is not None,
        "probe_reason": None if listed is None else str(listed.get("reason", "")),
        "output_ratio": None if listed is None else float(listed.get("output_ratio", math.nan)),
        "same_channel": [f"L{r.layer}[{r.row},{r.col}]" for r in table[at].itertuples()
                         if r.col != planted.col],
    }  # fmt: skip


CONFIRM_KEYS = ("tier", "confirmed", "effect", "ci_low", "ci_high", "null_mean", "null_q95",
                "p_value", "q_value", "p_contribution", "q_contribution", "topk_effect",
                "recovered", "restore_spike_effect", "null", "reason")  # fmt: skip


def _confirm_part(planted: PlantedWeight, confirmed) -> dict:
    if confirmed is None:
        return dict.fromkeys(CONFIRM_KEYS)
    table = read_table(confirmed, "confirmed table", ("candidate",), "use confirmed.tsv")
    mine = table[table["candidate"] == planted.candidate]
    if mine.empty:
        return dict.fromkeys(CONFIRM_KEYS) | {"tier": "not tested"}
    row = mine.iloc[0]
    part = {key: _plain(row[key]) if key in row.index else None for key in CONFIRM_KEYS}
    # `recovered` of the confirmation is a share of the effect; keep it apart from ours
    part["recovered_share"] = part.pop("recovered")
    return part


def _gene_part(planted: PlantedWeight, ranking) -> dict | None:
    """The planted genes' ranks in the causal ranking (its `rank`: by the weight's Δ log p
    through each gene's token, `path`) and, where the table has them, by the super
    activation (`act`, in `gene_effects.by_rank` order),
    each with the AUC of the planted genes against the other ranked genes."""
    if ranking is None:
        return None
    table = read_table(ranking, "gene ranking", ("gene", "rank"), "use genes_causal.tsv")
    table, is_planted, part = _planted_ranks(planted, table)
    if {"act_p_null", "act_effect"} <= set(table.columns):
        order = by_rank(table, "act").index
        act_rank = np.empty(len(table))
        act_rank[order] = np.arange(1, len(table) + 1)
        act = _ranks(table["gene"], act_rank, is_planted)
        part |= {f"act_{key}": value for key, value in act.items()}
    return part


def _association_part(planted: PlantedWeight, association) -> dict | None:
    """The planted genes' ranks in the cell-level association of the planted weight (its
    `rank`: by z, high = cells that depend more on the weight express the gene more)."""
    if association is None:
        return None
    table = read_table(association, "association table", ("candidate", "gene", "rank"),
                       "use the cells stage's association.tsv")  # fmt: skip
    return _planted_ranks(planted, table)[2]


def _planted_ranks(planted: PlantedWeight, table: pd.DataFrame):
    """(the planted candidate's ranked rows of a gene table with `rank`, which of them are
    planted genes, their counts with `_ranks` of the table's `rank`)."""
    if "candidate" in table.columns:
        table = table[table["candidate"] == planted.candidate]
    table = table.dropna(subset=["rank"]).reset_index(drop=True)
    mine = {g.upper() for g in planted.genes}
    is_planted = table["gene"].astype(str).str.upper().isin(mine).to_numpy()
    part = {"n_ranked": len(table), "n_planted_ranked": int(is_planted.sum())}
    part |= _ranks(table["gene"], table["rank"].to_numpy(dtype=float), is_planted)
    return table, is_planted, part


def _ranks(genes: pd.Series, ranks: np.ndarray, is_planted: np.ndarray) -> dict:
    """The planted genes' ranks, best and median rank, AUC against the other genes and the
    one-sided Mann-Whitney p that they rank above them (`p_rank`)."""
    mine, others = ranks[is_planted], ranks[~is_planted]
    part = {
        "ranks": {str(g): int(r) for g, r in zip(genes[is_planted], mine, strict=True)},
        "best_rank": int(mine.min()) if len(mine) else None,
        "median_rank": float(np.median(mine)) if len(mine) else None,
        "auc": None,
        "p_rank": None,
    }
    if len(mine) and len(others):
        test = mannwhitneyu(others, mine, alternative="greater")
        part["auc"] = float(test.statistic / (len(mine) * len(others)))
        part["p_rank"] = float(test.pvalue)
    return part


def _enrichment_part(planted: PlantedWeight, enrichment) -> dict | None:
    if enrichment is None:
        return None
    table = read_table(enrichment, "enrichment table", ("library", "Term"), "use prerank.tsv")
    library, _, name = planted.gene_set.partition(":")
    mine = table[(table["library"] == library) & (table["Term"] == name)]
    if mine.empty:
        return {"tested": False}
    row = mine.iloc[0]
    keys = ("NES", "NOM p-val", "P-value", "q_all_tests", "call")
    return {"tested": True} | {k: _plain(row[k]) for k in keys if k in row.index}


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _statement(score: dict) -> str:
    who = f"the planted weight {score['candidate']} ({score['gene_set'] or 'given genes'})"
    if not score["found"]:
        why = score["probe_reason"] or "not listed"
        return f"The probe missed {who}: {why}."
    tier = score.get("tier")
    if tier is None:
        return f"The probe found {who} (rank {score['probe_rank']}); it was not confirmed yet."
    numbers = [
        f"effect {_number(score['effect'], '.3g')} nats per cell",
        f"magnitude-null mean {_number(score['null_mean'], '.3g')}",
        f"recovered {_number(score['recovered_share'], '.0%')}",
    ]
    return (
        f"The probe found {who} (rank {score['probe_rank']} of {score['n_accepted']}); "
        f"confirmation: {tier} ({', '.join(numbers)})."
    )


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# --- the workflow's stages ------------------------------------------------------------

PLANT_FILES = {"checkpoint": CHECKPOINT_DIR, "planted": PLANTED_FILE, "gene_sets": GENE_SETS_FILE,
               "data": "tokenised.h5ad"}  # fmt: skip


def training_sample(adata: ad.AnnData, max_train: int, seed: int) -> ad.AnnData:
    """`adata` with at most `max_train` training cells and a quarter as many validation
    cells (at least 32), drawn with `seed`, and every test cell (0: all cells)."""
    if not max_train:
        return adata
    rng = np.random.default_rng([seed, 3])
    split = adata.obs["split"].astype(str).to_numpy()
    keep = [np.flatnonzero(split == "test")]
    for name, n in (("train", max_train), ("val", max(max_train // 4, 32))):
        rows = np.flatnonzero(split == name)
        keep.append(rng.choice(rows, min(n, len(rows)), replace=False))
    return adata[np.sort(np.concatenate(keep))].copy()


def run_plant(inputs, outputs, settings: ControlSettings, *, gene_sets: GeneSetSettings):
    """The control's planting stage: `plant_control` of `inputs["init"]` (the starting
    checkpoint) on `inputs["data"]` with the libraries of `gene_sets`, into `outputs`' folder
    (checkpoint/, planted.json, gene_sets.tsv), and the cells the control is fine-tuned and
    evaluated on (`training_sample`: `settings.max_train_cells`) to `outputs["data"]`."""
    paths = named_paths(outputs, PLANT_FILES)
    adata = read_tokenised(inputs["data"])
    planted = plant_control(adata, inputs["init"], paths["planted"].parent,
                            load_gene_sets(gene_sets), settings)  # fmt: skip
    sample = training_sample(adata, settings.max_train_cells, settings.seed)
    sample.uns["positive_control"] = {"candidate": planted.candidate, "gene_set": planted.gene_set}
    write_h5ad(sample, paths["data"])
    log.info("control %s (%s, %d genes) planted; fine-tuned on %d of %d cells",
             planted.candidate, planted.gene_set, len(planted.genes), sample.n_obs,
             adata.n_obs)  # fmt: skip
    return planted


def planted_candidates(planted: PlantedWeight, candidates) -> pd.DataFrame:
    """The probe's row of the planted weight (`candidates`: its candidates.tsv), or its
    coordinates as a candidate the probe did not accept when the probe did not list it: what
    the control's confirmation tests. Its other spikes are not what the control measures,
    and confirming them would cost as much as the user's own confirmation."""
    table = read_table(candidates, "candidates table", ("module", "row", "col", "accepted"),
                       "use the probe's candidates.tsv")  # fmt: skip
    mine = table[
        (table["module"] == planted.module)
        & (table["row"] == planted.row)
        & (table["col"] == planted.col)
    ]
    return mine.head(1) if len(mine) else planted.to_frame().assign(accepted=False)


def run_candidates(inputs, outputs) -> pd.DataFrame:
    """`planted_candidates` of `inputs["planted"]` among `inputs["candidates"]`, written as
    planted_candidate.tsv into `outputs` (a folder, or named outputs with `candidates`)."""
    table = planted_candidates(read_planted(inputs["planted"]), inputs["candidates"])
    write_tsv(named_paths(outputs, {"candidates": "planted_candidate.tsv"})["candidates"], table)
    return table


def run_score(inputs, outputs) -> dict:
    """The control's score (`score_control`) from its stages' tables: `inputs["planted"]`,
    the probe's `candidates`, the confirmation's `confirmed`, the causal ranking `genes`,
    the enrichment folder `enrich` (the planted candidate's causal prerank) and, where given,
    the cells stage's `association`, written as score.json into `outputs` (a folder, or
    named outputs with `score`)."""
    planted = read_planted(inputs["planted"])
    enrichment = Path(inputs["enrich"]) / f"{candidate_dirname(planted.candidate)}_causal"
    prerank = enrichment / "prerank.tsv"
    score = score_control(
        planted, inputs["candidates"], inputs["confirmed"], inputs["genes"],
        prerank if prerank.exists() else None, inputs.get("association"),
    )  # fmt: skip
    write_json(named_paths(outputs, {"score": "score.json"})["score"], score)
    log.info("%s", score["statement"])
    return score
