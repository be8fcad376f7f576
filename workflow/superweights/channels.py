"""Which genes a super weight acts on: its contribution per gene token, against a null.

For a super weight `w = W[row, col]` of a down-projection (`transformer_encoder.layers.l.linear2`)
forward hooks record at every token of every cell (gene tokens and `<cls>`):

- `xw`: what the weight adds to output channel `row`, `x[t, col] * w`, where `x[t, col]`
  is the down-projection's input (the MLP hidden unit, after ReLU); `abs_xw`: its size;
- `output_act`: the down-projection's output channel `row`; `resid_act`: channel `row` of
  the layer's output (the residual stream after the block, after `norm2` in post-LN models);
- `ablation_effect`: the expression decoder's prediction at the token with `w = 0` minus the
  original prediction (layers l.. are rerun; the weight is restored bit for bit).

A gene occurs at most once per cell, so a gene's mean is over the `n_cells` cells whose
sequence holds it; `<cls>` occurs in every cell and is reported apart (`cls.tsv`). Means are
taken over all cells ("all"), per cell type (`obs["cell_type"]`) and per level of each strata
column (e.g. ADNC).

Gene score, a z-score against magnitude-matched null weights: the ones the confirmation
pruned (ablate's nulls.tsv) when given, else drawn alike (`confirm.null_positions`: the
same matrix, |w| within a factor `band`, own row and column excluded, largest-|w| fallback).
With `a_g` (`abs_xw`) the mean of |x[t, col] * w| over gene g's tokens, `s_g` (`se`) its
standard error, and `a_g^(j)` the same mean for null weight j = 1..n_null:

    z_g = (a_g - mean_j a_g^(j)) / sqrt(sd_j(a_g^(j))^2 + s_g^2)

The null removes what any comparable weight of the matrix does at the gene (cell identity,
token frequency); `s_g` keeps a gene seen in few cells from ranking high by chance. `p_null`
is the one-sided empirical p, (1 + #{j: a_g^(j) >= a_g}) / (n_null + 1). A gene is ranked
in a stratum when it occurs in at least `min_cells` cells (>= 2, so that `s_g` exists) and
the denominator is positive. Rank 1 is the largest z; the percentile is 100 for rank 1 and
0 for the last rank of a stratum.

Null-weight rankings (`null_genes.tsv`, over all cells): each null weight j scored the same
way against the other n_null - 1 null weights,

    z_g^(j) = (a_g^(j) - mean_{k != j} a_g^(k)) / sqrt(sd_{k != j}(a_g^(k))^2 + s_g^(j)^2)

with `s_g^(j)` the standard error of |x[t, col_j] * w_j| over gene g's tokens, and the same
`min_cells` rule. These are the rankings a weight of the candidate's size would give when it
is not special; the enrichment stage runs its tests on them to calibrate the candidate's.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .confirm import null_positions
from .data.preprocess import read_tokenised
from .editing import check_candidate, evaluation, layer_of, read_table, zeroed
from .errors import UserError
from .genes import GENE_SETS_DIR, GENES_OF_INTEREST, read_gmt
from .model.args import cell_cut
from .model.cells import cell_batches, sample_rows
from .model.checkpoint import load_checkpoint, pick_device
from .model.scgpt import ScGPTModel
from .outputs import named_paths, write_json, write_tsv
from .settings import ChannelSettings

log = logging.getLogger(__name__)

GWAS_GMT = GENE_SETS_DIR / "bellenguez2022_gwas.gmt"
ALL, CELL_TYPE, CLS = "all", "cell type", "<cls>"
OUTPUT_TABLES = ("genes", "genes_of_interest", "cls", "channels", "null_genes")
OUTPUT_FILES = {name: f"{name}.tsv" for name in OUTPUT_TABLES} | {"summary": "summary.json"}
MEASURES = ("xw", "abs_xw", "abs_xw_sq", "output_act", "resid_act",
            "ablation_effect")  # fmt: skip
"""Per-token measures summed per (stratum, gene); the nulls' magnitudes follow them."""
STRATUM = ["candidate", "confirmed", "stratum_type", "stratum"]
SCORE_COLUMNS = ["n_cells", "xw", "abs_xw", "se", "null_mean_abs", "null_sd_abs", "z",
                 "p_null"]  # fmt: skip
GENE_COLUMNS = [*STRATUM, "gene", *SCORE_COLUMNS, "rank", "percentile", "output_act",
                "resid_act", "ablation_effect"]  # fmt: skip
CLS_COLUMNS = [*STRATUM, *SCORE_COLUMNS, "output_act", "resid_act"]
INTEREST_COLUMNS = [*STRATUM, "gene", "status", "n_cells", "z", "p_null", "rank", "percentile",
                    "n_ranked"]  # fmt: skip
CHANNEL_COLUMNS = ["candidate", "module", "layer", "row", "col", "weight", "confirmed", "null",
                   "nulls"]  # fmt: skip
NULL_GENE_COLUMNS = ["candidate", "confirmed", "null", "null_row", "null_col", "gene", "n_cells",
                     "z"]  # fmt: skip
"""null_genes.tsv: null weight `null` (1..n_null, at `null_row`, `null_col`) scored like the
candidate against the other null weights, over all cells; ranked genes only, by z."""
NOT_RANKED = {"few": "in fewer than min_cells cells", "flat": "z undefined (no variation)"}


def default_genes_of_interest() -> tuple[str, ...]:
    """`GENES_OF_INTEREST`, then the Bellenguez et al. 2022 GWAS genes."""
    gwas = [g for genes in read_gmt(GWAS_GMT).values() for g in genes]
    return tuple(dict.fromkeys([*GENES_OF_INTEREST, *gwas]))


@dataclass
class Channel:
    """A super weight whose channels are mapped: `module.weight[row, col]` of `layer`, and
    its null weights (`null` says which kind, `nulls` their (row, col))."""

    candidate: str
    module: str
    layer: int
    row: int
    col: int
    weight: float
    confirmed: bool
    null: str = ""
    nulls: tuple[tuple[int, int], ...] = ()

    def row_dict(self) -> dict:
        """The fields shown in tables, with the null's size in place of its positions."""
        fields = asdict(self)
        return {**fields, "nulls": len(fields["nulls"])}


@dataclass
class ChannelResult:
    """Tables of one channel map (see `write_outputs` for the files)."""

    genes: pd.DataFrame
    genes_of_interest: pd.DataFrame
    cls: pd.DataFrame
    channels: pd.DataFrame
    summary: dict
    null_genes: pd.DataFrame


# --- candidates -------------------------------------------------------------------------


def _flag(value) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    return str(value).strip().lower() == "true"


def select_channels(
    model: nn.Module, candidates: pd.DataFrame | str | Path, n_unconfirmed: int = 1
) -> list[Channel]:
    """Confirmed candidates plus the `n_unconfirmed` strongest others, checked against the model.

    `candidates` needs columns module, row, col (layer, weight, confirmed, candidate and
    effect are used when present). Strength of unconfirmed ones: `effect`, else |weight|.
    """
    frame = (
        candidates if isinstance(candidates, pd.DataFrame) else pd.read_csv(candidates, sep="\t")
    )
    missing = [c for c in ("module", "row", "col") if c not in frame.columns]
    if missing:
        raise UserError(f"candidates table lacks column(s) {missing}; run the ablate stage first")
    frame = frame.drop_duplicates(["module", "row", "col"]).copy()
    if frame.empty:
        raise UserError("the candidates table is empty: there is no super weight to map")
    if "confirmed" not in frame.columns:
        log.warning("candidates table has no 'confirmed' column; treating all as unconfirmed")
        frame["confirmed"] = False
    frame["confirmed"] = frame["confirmed"].map(_flag)
    key = next((k for k in ("effect", "weight") if k in frame.columns), None)
    strength = pd.to_numeric(frame[key], errors="coerce").abs().fillna(0) if key else 0.0
    others = frame.assign(strength=strength)[~frame["confirmed"]]
    others = others.sort_values("strength", ascending=False, kind="stable")
    chosen = pd.concat([frame[frame["confirmed"]], others.head(n_unconfirmed)])
    channels = []
    for r in chosen.itertuples(index=False):
        module, row, col = str(r.module), int(r.row), int(r.col)
        listed = getattr(r, "weight", math.nan)
        value, layer = check_candidate(model, module, row, col, listed), layer_of(module)
        name = str(getattr(r, "candidate", "") or f"L{layer}[{row},{col}]")
        channels.append(Channel(name, module, layer, row, col, value, bool(r.confirmed)))
    if not any(c.confirmed for c in channels):
        log.warning(
            "no confirmed super weight: %s",
            "the map is exploratory (unconfirmed candidates only)"
            if channels
            else "nothing to map (set channels.n_unconfirmed for an exploratory map)",
        )
    return channels


def with_nulls(
    model: nn.Module,
    channels: Sequence[Channel],
    n_null: int,
    band: float,
    seed: int,
    drawn: pd.DataFrame | None = None,
):
    """The channels with their magnitude-matched null weights: the first `n_null` that the
    confirmation drew for the candidate (`drawn`: ablate's nulls.tsv, candidate, row, col,
    and `kind`, of which the magnitude-matched draws are used) when it drew at least 2,
    else drawn here alike (`confirm.null_positions`)."""
    modules = dict(model.named_modules())
    if drawn is not None and "kind" in drawn.columns:
        drawn = drawn[drawn["kind"] == "magnitude"]
    out = []
    for i, c in enumerate(channels):
        weight = modules[c.module].weight
        own = drawn[drawn["candidate"] == c.candidate] if drawn is not None else ()
        if len(own) >= 2:
            positions = list(zip(own["row"].astype(int), own["col"].astype(int), strict=True))
            positions = positions[:n_null]
            if not all(0 <= r < weight.shape[0] and 0 <= q < weight.shape[1] for r, q in positions):
                raise UserError(f"the null draws of {c.candidate} lie outside {c.module}")
            kind = "the confirmation's draws"
        else:
            rng = np.random.default_rng([seed, i])
            kind, positions = null_positions(weight, c.row, c.col, n_null, band, rng)
        out.append(replace(c, null=kind, nulls=tuple(positions)))
    return out


# --- recording --------------------------------------------------------------------------


class _Recorder:
    """Forward hooks keeping, for the batch being run, the hidden state entering and leaving
    each candidate's layer ("enter", "resid"; keyed by layer) and the input and output of
    each candidate's down-projection ("in", "out"; keyed by module name)."""

    def __init__(self, model: ScGPTModel, channels: Sequence[Channel]):
        self.seen: dict[tuple[str, int | str], Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = []
        for key in sorted({c.layer for c in channels}):
            self._watch(model.transformer_encoder.layers[key], key, "enter", "resid")
        for key in sorted({c.module for c in channels}):
            self._watch(modules[key], key, "in", "out")

    def _watch(self, module: nn.Module, key, before: str, after: str) -> None:
        def pre_hook(module, args):
            self.seen[(before, key)] = args[0].detach()

        def hook(module, args, output):
            self.seen[(after, key)] = output.detach()

        self.handles.append(module.register_forward_pre_hook(pre_hook))
        self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Sums:
    """Per (stratum, gene) sums of each measure (`MEASURES`, then each null's magnitude) and
    token counts; per gene, over all cells, each null's squared magnitude."""

    def __init__(self, n_strata: int, n_genes: int, n_null: int):
        self.n_genes = n_genes
        size = (len(MEASURES) + n_null, n_strata * n_genes)
        self.sums = torch.zeros(size, dtype=torch.float64)
        self.counts = torch.zeros(n_strata * n_genes, dtype=torch.float64)
        self.null_squares = torch.zeros((n_null, n_genes), dtype=torch.float64)

    def add(self, strata: Tensor, genes: Tensor, values: Tensor) -> None:
        """strata [P, T] (stratum per partition, -1 = none; partition 0 is "all", stratum 0
        for every token), genes [T], values [M, T]."""
        for partition in strata:
            keep = partition >= 0
            flat = partition[keep] * self.n_genes + genes[keep]
            self.sums.index_add_(1, flat, values[:, keep])
            self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.null_squares.index_add_(1, genes, values[len(MEASURES) :] ** 2)

    def null_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Token counts [genes] and z [nulls, genes] of each null weight against the others,
        over all cells (stratum 0; the module docstring's z_g^(j)); NaN where undefined."""
        n = self.counts[: self.n_genes].numpy()
        means = self.sums[len(MEASURES) :, : self.n_genes].numpy() / np.where(n > 0, n, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            variance = (self.null_squares.numpy() / n - means**2) * n / (n - 1)
            se = np.sqrt(np.clip(variance, 0, None) / n)
            z = np.full_like(means, np.nan)
            for j in range(len(means)):
                others = np.delete(means, j, axis=0)
                spread = np.sqrt(others.std(axis=0, ddof=1) ** 2 + se[j] ** 2)
                z[j] = (means[j] - others.mean(axis=0)) / spread
        return n, np.where(np.isfinite(z), z, np.nan)

    def scores(self, stratum: int) -> pd.DataFrame:
        """One row per gene index: `SCORE_COLUMNS` (z as in the module docstring) and the
        means of the other measures; NaN where a gene has no token in the stratum."""
        lo, hi = stratum * self.n_genes, (stratum + 1) * self.n_genes
        n = self.counts[lo:hi].numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.sums[:, lo:hi].numpy() / n
            frame = pd.DataFrame(dict(zip(MEASURES, means[: len(MEASURES)], strict=True)))
            nulls = means[len(MEASURES) :]
            variance = (frame.pop("abs_xw_sq") - frame["abs_xw"] ** 2) * n / (n - 1)
            se = np.sqrt(np.clip(variance, 0, None) / n)
            null_mean, null_sd = nulls.mean(axis=0), nulls.std(axis=0, ddof=1)
            z = (frame["abs_xw"] - null_mean) / np.sqrt(null_sd**2 + se**2)
        exceed = (nulls >= frame["abs_xw"].to_numpy()).sum(axis=0)
        return frame.assign(
            n_cells=n.astype(np.int64), se=se, null_mean_abs=null_mean, null_sd_abs=null_sd,
            z=z.where(np.isfinite(z)), p_null=(1 + exceed) / (len(nulls) + 1),
        )  # fmt: skip


def _strata(obs: pd.DataFrame | None, n_cells: int, columns: Sequence[str]):
    """[(stratum_type, stratum)] and a [partitions, cells] index array (-1 = not in any)."""
    names = [(ALL, ALL)]
    codes = [np.zeros(n_cells, dtype=np.int64)]
    partitions = [("cell_type", CELL_TYPE)] + [(c, c) for c in columns]
    for column, kind in partitions:
        if obs is None or column not in obs.columns:
            log.info("no obs column %r: no strata by it", column)
            continue
        values = obs[column]
        levels = [v for v in pd.unique(values) if pd.notna(v)]
        if hasattr(values, "cat"):
            levels = [v for v in values.cat.categories if v in set(levels)]
        index = {v: len(names) + i for i, v in enumerate(levels)}
        codes.append(np.array([index.get(v, -1) if pd.notna(v) else -1 for v in values]))
        names += [(kind, str(v)) for v in levels]
    return names, np.stack(codes)


# --- the map ----------------------------------------------------------------------------


def map_channel_genes(
    model: ScGPTModel,
    batches: Sequence[Mapping[str, Tensor]],
    channels: Sequence[Channel],
    vocab: Mapping[str, int],
    settings: ChannelSettings,
    obs: pd.DataFrame | None = None,
    data_genes: Sequence[str] | None = None,
    drawn_nulls: pd.DataFrame | None = None,
) -> ChannelResult:
    """Per-gene contributions, z-scores and pruning effects of each channel, overall and per
    stratum, and the same at `<cls>`.

    `batches`: dicts with gene_ids, values, padding_mask (True = pad) whose position 0 is
    `<cls>`; `obs`: the cells' metadata in batch order; `data_genes`: the data's genes, to
    tell genes of interest missing from the data apart from those not expressed in these
    cells; `drawn_nulls`: the confirmation's null draws (`with_nulls`). The model's weights
    and train/eval mode are restored.
    """
    n_cells = sum(len(b["gene_ids"]) for b in batches)
    if obs is not None and len(obs) != n_cells:
        raise ValueError(f"obs has {len(obs)} rows for {n_cells} cells")
    if n_cells == 0:
        raise UserError("no cells to map the channels on")
    if not any((~b["padding_mask"][:, 1:].bool()).any() for b in batches):
        raise UserError("the cells carry no gene tokens (no expressed genes in the vocabulary)")
    tokens = torch.unique(torch.cat([_tokens(b)[0].cpu() for b in batches]))
    compact = torch.full((int(tokens.max()) + 1,), -1, dtype=torch.long)
    compact[tokens] = torch.arange(len(tokens))
    names, codes = _strata(obs, n_cells, settings.strata_columns)
    codes = torch.from_numpy(codes)
    channels = with_nulls(
        model, channels, settings.n_null, settings.band, settings.seed, drawn_nulls
    )
    sums = {c.candidate: _Sums(len(names), len(tokens), len(c.nulls)) for c in channels}
    with evaluation(model):
        recorder = _Recorder(model, channels)
        try:
            start = 0
            for batch in batches if channels else []:
                strata = codes[:, start + _tokens(batch)[1][0].cpu()]
                genes = compact[_tokens(batch)[0].cpu()]
                for c, values in _measures(model, recorder, batch, channels):
                    sums[c.candidate].add(strata, genes, values.cpu())
                start += len(batch["gene_ids"])
        finally:
            recorder.close()
    id_to_gene = {i: g for g, i in vocab.items()}
    gene_names = np.array([id_to_gene.get(int(t), str(int(t))) for t in tokens], dtype=object)
    interest = settings.genes_of_interest or default_genes_of_interest()
    missing = {g: "not in vocabulary" for g in interest if g not in vocab}
    if data_genes is not None:
        data = set(data_genes)
        missing |= {g: "not in the data" for g in interest if g in vocab and g not in data}
    gene_tables, cls_rows, interest_rows, null_tables = [], [], [], []
    for c in channels:
        null_tables.append(_null_ranked(c, *sums[c.candidate].null_scores(), gene_names,
                                        settings.min_cells))  # fmt: skip
        for s, (kind, stratum) in enumerate(names):
            scores = sums[c.candidate].scores(s).assign(gene=gene_names)
            scores.insert(0, "candidate", c.candidate)
            scores = scores.assign(confirmed=c.confirmed, stratum_type=kind, stratum=stratum)
            is_cls = scores["gene"] == CLS
            cls_rows.append(scores.loc[is_cls & (scores["n_cells"] > 0), CLS_COLUMNS])
            genes = scores[~is_cls & (scores["n_cells"] > 0)]
            ranked = _ranked(genes, settings.min_cells)
            gene_tables.append(ranked)
            where = dict(zip(STRATUM, (c.candidate, c.confirmed, kind, stratum), strict=True))
            interest_rows += _interest(where, genes, ranked, interest, missing, settings.min_cells)
    genes_table = _concat(gene_tables, GENE_COLUMNS)
    interest_table = pd.DataFrame(interest_rows, columns=INTEREST_COLUMNS)
    _warn_missing(interest_table)
    channel_table = pd.DataFrame([c.row_dict() for c in channels], columns=CHANNEL_COLUMNS)
    summary = _summary(channels, genes_table, n_cells, len(tokens), settings)
    null_genes = _concat(null_tables, NULL_GENE_COLUMNS)
    return ChannelResult(genes_table, interest_table, _concat(cls_rows, CLS_COLUMNS),
                         channel_table, summary, null_genes)  # fmt: skip


def _measures(model: ScGPTModel, recorder: _Recorder, batch, channels: Sequence[Channel]):
    """(channel, values [len(MEASURES) + n_null, tokens]) of one batch, at `_tokens`."""
    out = model(batch["gene_ids"], batch["values"], batch["padding_mask"])
    where = _tokens(batch)[1]
    for c in channels:
        with zeroed(model, [(c.module, c.row, c.col)]):
            hidden = model.encode(recorder.seen[("enter", c.layer)], batch["padding_mask"], c.layer)
            pruned = model.decode(hidden, None, heads=("expr",))["expr"]
        weight = dict(model.named_modules())[c.module].weight
        rows, cols = map(list, zip(*[(c.row, c.col), *c.nulls], strict=True))
        x = recorder.seen[("in", c.module)][where][:, cols]
        contribution = (x * weight[rows, cols]).T.double()  # squares summed in float64
        magnitude = contribution.abs()
        observed = [
            recorder.seen[("out", c.module)][..., c.row],
            recorder.seen[("resid", c.layer)][..., c.row],
            pruned - out["expr"],
        ]
        observed = [m[where][None].double() for m in observed]
        values = [contribution[:1], magnitude[:1], magnitude[:1] ** 2, *observed, magnitude[1:]]
        yield c, torch.cat(values)


def _tokens(batch: Mapping[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Token ids of the non-padding positions (`<cls>` at 0 and the genes), and their indices."""
    where = (~batch["padding_mask"].bool()).nonzero(as_tuple=True)
    return batch["gene_ids"][where], where


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _ranked(genes: pd.DataFrame, min_cells: int) -> pd.DataFrame:
    """Genes with at least `min_cells` cells and a defined z, by z (ties by name)."""
    frame = genes[(genes["n_cells"] >= min_cells) & genes["z"].notna()]
    frame = frame.sort_values(["z", "gene"], ascending=[False, True], kind="stable")
    n = len(frame)
    frame = frame.assign(rank=np.arange(1, n + 1))
    frame["percentile"] = 100.0 * (n - frame["rank"]) / (n - 1) if n > 1 else 100.0
    return frame[GENE_COLUMNS].reset_index(drop=True)


def _null_ranked(channel: Channel, n, z, gene_names, min_cells: int) -> pd.DataFrame:
    """Each null weight's ranked genes (`NULL_GENE_COLUMNS`): >= `min_cells` cells, finite z,
    not `<cls>`; by z (ties by name) within each null weight."""
    frames = []
    for j, ((row, col), scores) in enumerate(zip(channel.nulls, z, strict=True), 1):
        frame = pd.DataFrame({"gene": gene_names, "n_cells": n.astype(np.int64), "z": scores})
        frame = frame[(frame["n_cells"] >= min_cells) & frame["z"].notna()]
        frame = frame[frame["gene"] != CLS].sort_values(["z", "gene"], ascending=[False, True])
        where = {"candidate": channel.candidate, "confirmed": channel.confirmed, "null": j,
                 "null_row": row, "null_col": col}  # fmt: skip
        frames.append(frame.assign(**where))
    return _concat(frames, NULL_GENE_COLUMNS)


def _interest(stratum, genes, ranked, interest, missing, min_cells) -> list[dict]:
    """Rank, percentile, z and p of each gene of interest, or why it has none."""
    seen = genes.set_index("gene")
    by_gene = ranked.set_index("gene")
    rows = []
    for gene in interest:
        n = int(seen.at[gene, "n_cells"]) if gene in seen.index else 0
        hit = by_gene.loc[gene] if gene in by_gene.index else None
        if gene in missing:
            status = missing[gene]
        elif hit is not None:
            status = "ranked"
        elif n == 0:
            status = "not in these cells"
        else:
            status = NOT_RANKED["few"] if n < min_cells else NOT_RANKED["flat"]
        keys = ("z", "p_null", "rank", "percentile")
        values = {k: np.nan if hit is None else hit[k] for k in keys}
        rows.append({**stratum, "gene": gene, "status": status, "n_cells": n, **values,
                     "n_ranked": len(ranked)})  # fmt: skip
    return rows


def _warn_missing(interest: pd.DataFrame) -> None:
    overall = interest[interest["stratum_type"] == ALL].drop_duplicates("gene")
    for status in ("not in vocabulary", "not in the data", "not in these cells"):
        genes = overall.loc[overall["status"] == status, "gene"].tolist()
        if genes:
            log.warning("genes of interest %s: %s", status, ", ".join(genes))


def _summary(channels, genes: pd.DataFrame, n_cells: int, n_genes: int, settings) -> dict:
    overall = genes[genes["stratum_type"] == ALL]
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "candidates": [
            {
                **c.row_dict(),
                "top_genes": overall.loc[overall["candidate"] == c.candidate, "gene"]
                .head(10)
                .tolist(),
            }
            for c in channels
        ],
        "settings": asdict(settings),
    }


# --- entry points -----------------------------------------------------------------------


def map_channels(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    candidates: pd.DataFrame | str | Path,
    settings: ChannelSettings,
    device: str | torch.device | None = None,
    nulls: pd.DataFrame | str | Path | None = None,
) -> ChannelResult:
    """Map the candidates' channels to genes on (up to `max_cells`) cells of `splits`, cut
    as the checkpoint's training cut them, with the confirmation's null draws when `nulls`
    (ablate's nulls.tsv) is given."""
    adata = read_tokenised(tokenised)
    device = torch.device(device) if device else pick_device()
    model, config, vocab = load_checkpoint(checkpoint, device=device)
    channels = select_channels(model, candidates, settings.n_unconfirmed)
    split = adata.obs["split"].astype(str).to_numpy()
    rows = sample_rows(split, settings.splits, settings.max_cells, settings.seed)
    cut = cell_cut(checkpoint)
    batches = cell_batches(
        adata, vocab, rows, pad_token_id=config.pad_token_id, batch_size=settings.batch_size,
        max_seq_len=cut.max_seq_len, seed=cut.seed, labelled=False, device=device,
    )  # fmt: skip
    log.info("channel map: %d candidate(s) on %d cells", len(channels), rows.size)
    obs = adata.obs.iloc[rows]
    genes = list(map(str, adata.var_names))
    drawn = None
    if nulls is not None:
        drawn = read_table(nulls, "null draws table", ("candidate", "row", "col"),
                           "ablate's nulls.tsv has them")  # fmt: skip
    return map_channel_genes(model, batches, channels, vocab, settings, obs, genes, drawn)


def write_outputs(result: ChannelResult, outputs) -> list[Path]:
    """Write genes.tsv, genes_of_interest.tsv, cls.tsv, channels.tsv, null_genes.tsv and
    summary.json, each atomically.

    `outputs`: a folder or the rule's named outputs (`named_paths`).
    """
    paths = named_paths(outputs, OUTPUT_FILES)
    tables = [write_tsv(paths[name], getattr(result, name)) for name in OUTPUT_TABLES]
    return [*tables, write_json(paths["summary"], result.summary)]


def run(inputs, outputs, settings: ChannelSettings) -> ChannelResult:
    """The channel map stage: `map_channels` of `inputs["candidates"]` of
    `inputs["checkpoint"]` on `inputs["data"]`, with `inputs["nulls"]` where given; write
    the tables (`write_outputs`) to `outputs`."""
    result = map_channels(
        inputs["data"],
        inputs["checkpoint"],
        inputs["candidates"],
        settings,
        nulls=inputs.get("nulls"),
    )
    write_outputs(result, outputs)
    return result
