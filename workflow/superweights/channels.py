"""Which genes drive a super weight's channels: per-gene activations and pruning effects.

For a super weight `W[row, col]` of a down-projection (`transformer_encoder.layers.l.linear2`)
forward hooks record at every gene token of every cell:

- `input_act`: the down-projection's input channel `col` (the MLP hidden unit, after ReLU);
- `output_act`: its output channel `row`;
- `resid_act`: channel `row` of the layer's output, i.e. the residual stream after the
  block (after `norm2` in post-LN models);
- `ablation_effect`: the expression decoder's prediction at the token with `W[row, col] = 0`
  minus the original prediction (layers l.. are rerun; the weight is restored bit for bit).

A gene occurs at most once per cell, so averaging over its tokens averages over the cells
whose sequence contains it (`n_cells`). Averages are taken over all cells ("all"), per cell
type (`obs["label"]`, "cell type") and per level of each strata column (e.g. ADNC).

Ranking score: `|W[row, col]| x mean |input_act|`, the mean magnitude that the super weight
itself adds to output channel `row` at the gene's token. Rank 1 is the largest score; the
percentile is 100 for rank 1 and 0 for the last rank of a stratum. Only genes present in at
least `min_cells` cells of a stratum are ranked there.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .editing import check_candidate, layer_of, zeroed
from .enrich import RESOURCE_DIR, read_gmt
from .errors import UserError
from .genes import GENES_OF_INTEREST
from .model.cells import cell_batches, sample_rows
from .model.checkpoint import load_checkpoint
from .model.scgpt import ScGPTModel
from .model.train import pick_device, read_tokenised
from .outputs import named_paths, write_json, write_tsv

log = logging.getLogger(__name__)

GWAS_GMT = RESOURCE_DIR / "bellenguez2022_gwas.gmt"
ALL, CELL_TYPE = "all", "cell type"
OUTPUT_TABLES = ("genes", "genes_of_interest", "channels")
OUTPUT_FILES = {name: f"{name}.tsv" for name in OUTPUT_TABLES} | {"summary": "summary.json"}
MEASURES = ("input_act", "abs_input", "output_act", "resid_act", "ablation_effect")
GENE_COLUMNS = [
    "candidate", "confirmed", "stratum_type", "stratum", "gene", "n_cells", "input_act",
    "output_act", "resid_act", "ablation_effect", "score", "rank", "percentile",
]  # fmt: skip
INTEREST_COLUMNS = [
    "candidate", "confirmed", "stratum_type", "stratum", "gene", "status", "n_cells", "score",
    "rank", "percentile", "n_ranked",
]  # fmt: skip


def default_genes_of_interest() -> tuple[str, ...]:
    """`GENES_OF_INTEREST`, then the Bellenguez et al. 2022 GWAS genes."""
    gwas = [g for genes in read_gmt(GWAS_GMT).values() for g in genes]
    return tuple(dict.fromkeys([*GENES_OF_INTEREST, *gwas]))


@dataclass
class ChannelSettings:
    """Cells, strata and candidates of the channel map.

    `splits`: obs["split"] values whose cells are used (empty: all cells), at most
    `max_cells` of them (a seeded sample). `strata_columns`: obs columns averaged per level
    besides the cell type. `n_unconfirmed`: strongest unconfirmed candidates mapped too
    (flagged `confirmed = False`). `genes_of_interest`: None = `default_genes_of_interest()`.
    """

    splits: tuple[str, ...] = ("test",)
    strata_columns: tuple[str, ...] = ("Overall AD neuropathological Change",)
    genes_of_interest: tuple[str, ...] | None = None
    n_unconfirmed: int = 1
    min_cells: int = 3
    max_cells: int = 2000
    batch_size: int = 32
    max_seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        self.splits, self.strata_columns = tuple(self.splits), tuple(self.strata_columns)
        if self.genes_of_interest is not None:
            self.genes_of_interest = tuple(self.genes_of_interest)
        if self.n_unconfirmed < 0 or self.min_cells < 1:
            raise UserError("n_unconfirmed must be >= 0 and min_cells >= 1")
        if self.max_cells < 1 or self.batch_size < 1 or self.max_seq_len < 2:
            raise UserError("max_cells and batch_size must be >= 1, max_seq_len >= 2")


@dataclass
class Channel:
    """A super weight whose channels are mapped: `module.weight[row, col]` of `layer`."""

    candidate: str
    module: str
    layer: int
    row: int
    col: int
    weight: float
    confirmed: bool


@dataclass
class ChannelResult:
    """Tables of one channel map (see `write_outputs` for the files)."""

    genes: pd.DataFrame
    genes_of_interest: pd.DataFrame
    channels: pd.DataFrame
    summary: dict


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
        log.warning("no confirmed super weight: mapping the strongest unconfirmed candidate(s)")
    return channels


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
    """Per (stratum, gene) sums of each measure and token counts."""

    def __init__(self, n_strata: int, n_genes: int):
        self.n_genes = n_genes
        self.sums = torch.zeros(len(MEASURES), n_strata * n_genes, dtype=torch.float64)
        self.counts = torch.zeros(n_strata * n_genes, dtype=torch.float64)

    def add(self, strata: Tensor, genes: Tensor, values: Tensor) -> None:
        """strata [P, T] (stratum per partition, -1 = none), genes [T], values [M, T]."""
        for partition in strata:
            keep = partition >= 0
            flat = partition[keep] * self.n_genes + genes[keep]
            self.sums.index_add_(1, flat, values[:, keep])
            self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def means(self, stratum: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = stratum * self.n_genes, (stratum + 1) * self.n_genes
        counts = self.counts[lo:hi].numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[:, lo:hi].numpy() / counts, counts


def _strata(obs: pd.DataFrame | None, n_cells: int, columns: Sequence[str]):
    """[(stratum_type, stratum)] and a [partitions, cells] index array (-1 = not in any)."""
    names = [(ALL, ALL)]
    codes = [np.zeros(n_cells, dtype=np.int64)]
    partitions = [("label", CELL_TYPE)] + [(c, c) for c in columns]
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
) -> ChannelResult:
    """Per-gene activations and pruning effects of each channel, overall and per stratum.

    `batches`: dicts with gene_ids, values, padding_mask (True = pad) whose position 0 is
    `<cls>`; `obs`: the cells' metadata in batch order; `data_genes`: the data's genes, to
    tell genes of interest missing from the data apart from those not expressed in these
    cells. The model's weights and train/eval mode are restored.
    """
    n_cells = sum(len(b["gene_ids"]) for b in batches)
    if obs is not None and len(obs) != n_cells:
        raise ValueError(f"obs has {len(obs)} rows for {n_cells} cells")
    if n_cells == 0:
        raise UserError("no cells to map the channels on")
    tokens = torch.unique(torch.cat([_gene_tokens(b)[0].cpu() for b in batches]))
    if tokens.numel() == 0:
        raise UserError("the cells carry no gene tokens (no expressed genes in the vocabulary)")
    compact = torch.full((int(tokens.max()) + 1,), -1, dtype=torch.long)
    compact[tokens] = torch.arange(len(tokens))
    names, codes = _strata(obs, n_cells, settings.strata_columns)
    codes = torch.from_numpy(codes)
    sums = {c.candidate: _Sums(len(names), len(tokens)) for c in channels}
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, channels)
    start = 0
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch["gene_ids"], batch["values"], batch["padding_mask"])
                gene_ids, where = _gene_tokens(batch)
                genes = compact[gene_ids.cpu()]
                strata = codes[:, start + where[0].cpu()]
                for c in channels:
                    with zeroed(model, [(c.module, c.row, c.col)]):
                        hidden = model.encode(
                            recorder.seen[("enter", c.layer)], batch["padding_mask"], c.layer
                        )
                        pruned = model.decode(hidden, None, heads=("expr",))["expr"]
                    x_in = recorder.seen[("in", c.module)][..., c.col][where]
                    values = torch.stack(
                        [
                            x_in,
                            x_in.abs(),
                            recorder.seen[("out", c.module)][..., c.row][where],
                            recorder.seen[("resid", c.layer)][..., c.row][where],
                            (pruned - out["expr"])[where],
                        ]
                    )
                    sums[c.candidate].add(strata, genes, values.double().cpu())
                start += len(batch["gene_ids"])
    finally:
        recorder.close()
        model.train(was_training)
    id_to_gene = {i: g for g, i in vocab.items()}
    gene_names = [id_to_gene.get(int(t), str(int(t))) for t in tokens]
    interest = settings.genes_of_interest or default_genes_of_interest()
    missing = {g: "not in vocabulary" for g in interest if g not in vocab}
    if data_genes is not None:
        data = set(data_genes)
        missing |= {g: "not in the data" for g in interest if g in vocab and g not in data}
    tables, interest_rows = [], []
    for c in channels:
        for s, (kind, stratum) in enumerate(names):
            means, counts = sums[c.candidate].means(s)
            ranked = _ranked(c, kind, stratum, gene_names, means, counts, settings.min_cells)
            tables.append(ranked)
            seen = dict(zip(gene_names, counts.astype(int), strict=True))
            interest_rows += _interest(c, kind, stratum, ranked, seen, interest, missing)
    genes_table = pd.concat(tables, ignore_index=True)[GENE_COLUMNS]
    interest_table = pd.DataFrame(interest_rows, columns=INTEREST_COLUMNS)
    _warn_missing(interest_table)
    channel_table = pd.DataFrame([asdict(c) for c in channels])
    summary = _summary(channels, genes_table, n_cells, len(tokens), settings)
    return ChannelResult(genes_table, interest_table, channel_table, summary)


def _gene_tokens(batch: Mapping[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Token ids of the gene positions (not padding, not `<cls>` at 0) and their indices."""
    keep = ~batch["padding_mask"].bool()
    keep[:, 0] = False
    where = keep.nonzero(as_tuple=True)
    return batch["gene_ids"][where], where


def _ranked(c: Channel, kind, stratum, gene_names, means, counts, min_cells) -> pd.DataFrame:
    keep = counts >= min_cells
    frame = pd.DataFrame(
        {
            "candidate": c.candidate,
            "confirmed": c.confirmed,
            "stratum_type": kind,
            "stratum": stratum,
            "gene": np.asarray(gene_names, dtype=object)[keep],
            "n_cells": counts[keep].astype(np.int64),
            **{m: means[i][keep] for i, m in enumerate(MEASURES)},
        }
    )
    frame["score"] = abs(c.weight) * frame.pop("abs_input")
    frame = frame.sort_values(["score", "gene"], ascending=[False, True], kind="stable")
    n = len(frame)
    frame["rank"] = np.arange(1, n + 1)
    frame["percentile"] = 100.0 * (n - frame["rank"]) / (n - 1) if n > 1 else 100.0
    return frame.reset_index(drop=True)


def _interest(c, kind, stratum, ranked, seen, interest, missing) -> list[dict]:
    """Rank, percentile and score of each gene of interest, or why it has none."""
    by_gene = ranked.set_index("gene")
    rows = []
    for gene in interest:
        n = int(seen.get(gene, 0))
        hit = by_gene.loc[gene] if gene in by_gene.index else None
        if gene in missing:
            status = missing[gene]
        elif hit is not None:
            status = "ranked"
        else:
            status = "not in these cells" if n == 0 else "in fewer than min_cells cells"
        rows.append(
            {
                "candidate": c.candidate,
                "confirmed": c.confirmed,
                "stratum_type": kind,
                "stratum": stratum,
                "gene": gene,
                "status": status,
                "n_cells": n,
                "score": np.nan if hit is None else hit["score"],
                "rank": np.nan if hit is None else hit["rank"],
                "percentile": np.nan if hit is None else hit["percentile"],
                "n_ranked": len(ranked),
            }
        )
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
                **asdict(c),
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
) -> ChannelResult:
    """Map the candidates' channels to genes on (up to `max_cells`) cells of `splits`."""
    adata = read_tokenised(tokenised)
    device = torch.device(device) if device else pick_device()
    model, config, vocab = load_checkpoint(checkpoint, device=device)
    channels = select_channels(model, candidates, settings.n_unconfirmed)
    split = adata.obs["split"].astype(str).to_numpy()
    rows = sample_rows(split, settings.splits, settings.max_cells, settings.seed)
    batches = cell_batches(
        adata, vocab, rows, pad_token_id=config.pad_token_id, batch_size=settings.batch_size,
        max_seq_len=settings.max_seq_len, seed=settings.seed, labelled=False, device=device,
    )  # fmt: skip
    log.info("channel map: %d candidate(s) on %d cells", len(channels), rows.size)
    obs = adata.obs.iloc[rows]
    genes = list(map(str, adata.var_names))
    return map_channel_genes(model, batches, channels, vocab, settings, obs, genes)


def write_outputs(result: ChannelResult, outputs) -> list[Path]:
    """Write genes.tsv, genes_of_interest.tsv, channels.tsv and summary.json, each atomically.

    `outputs`: a folder or the rule's named outputs (`named_paths`).
    """
    paths = named_paths(outputs, OUTPUT_FILES)
    tables = [write_tsv(paths[name], getattr(result, name)) for name in OUTPUT_TABLES]
    return [*tables, write_json(paths["summary"], result.summary)]
