"""Causal gene effects of a super weight in the fine-tuned classifier, by exact interventions.

The token-level map (`channels`) scores where the weight's input unit fires; this stage asks
what the weight *does* through each gene. For a candidate `w = W[row, col]` of a
down-projection (`transformer_encoder.layers.l.linear2`), each evaluated cell `c` and each
gene token `g` of that cell (its `max_genes` most expressed ones), with `D(x) = log p(true
type | x) - log p(true type | x, w = 0)` the per-cell drop of log p when the weight is pruned,
three measures:

- `path` (the ranking's), the weight's effect through g's token: the weight adds
  `u_t[col] * w` to unit `row` of every token t; keeping that term at g's token only and
  pruning it at every other token, `path_effect(c, g) = log p(true type | c, w at g only) -
  log p(true type | c, w = 0)`. The cell itself is not changed. Where several tokens carry
  the weight's action and any one of them suffices (spikes on several genes' tokens, each an
  attention sink), each of them shows the whole effect, where removing one (`logp`) shows
  none; where g's unit is off (`u_t[col] = 0`, a ReLU) the effect is exactly 0;
- `logp`, the part of the weight's effect that needs g: g's token is removed (taken out and
  the cell re-padded at the end; scGPT has no positions, so this is the cell without the
  gene) and `logp_effect(c, g) = D(c) - D(c without g)`; it also sees genes that act
  upstream of the weight (through attention into the spike token), which `path` does not;
- `act`, the super activation: `a(x) = sum_t |y_t[row]|`, the magnitude of the module's
  output channel `row` summed over the real tokens (`<cls>` included), with the weight in
  place; `act_effect(c, g) = a(c) - a(c without g)`: where several tokens carry a massive
  activation, each counts.

Exact, no gradients. `path`: layer l runs once per cell, and each (weight, token) condition
is one copy of the cell from layer l + 1 on (`CellTypeScore.path_effects`). `logp` and `act`:
every copy of a cell (the cell, then the cell without each chosen gene) is stacked in the
batch dimension and run in one pass; removing a token at layer 0 changes every layer, so no
prefix is shared between copies, but within a copy the pruned runs share layers 0..l
(`CellTypeScore.zeroed_scores`: layer l once, then every pruned weight as its own stacked
copy from layer l + 1 on).

Per donor, a gene's effect is the mean over the donor's cells in which it was evaluated;
per gene, the mean of the donor means (`effect`, with `n_donors`, `n_cells` and `se`, the
standard error of the donor means). The same is computed for the candidate's
magnitude-matched null weights (the first `n_null` `kind == "magnitude"` draws of ablate's
nulls.tsv, as `channels.with_nulls` reads them) on the same cells and copies, giving
`effect^(j)`, j = 1..n_null, and

    z = (effect - mean_j effect^(j)) / sd_j(effect^(j))
    p_null = (1 + #{j: effect^(j) >= effect}) / (n_null + 1)     (one-sided: g carries the effect)
    q = BH(p_null) over the ranked genes of the candidate (scipy.stats.false_discovery_control)

A gene is ranked when it was evaluated in at least `min_cells` cells and its `path` z is
defined. Rank 1 is the smallest `path_p_null`; genes of equal p (at the floor 1/(n_null + 1)
many do when the weight is strong) by the larger `path_effect`, then by name. Not by z: z
divides by each gene's own null sd, from n_null draws, and beyond the nulls' range it
extrapolates a Gaussian; where null weights do next to nothing through a gene the sd is
tiny and a minute effect gets an enormous z, while the gene that feeds the weight, through
whose token the null weights act too, gets a wide null sd. On the planted released-format
checkpoint of the tests, ordering the `logp` effects by z put the feeding gene 6th (z 63,
effect 5.7) behind genes whose effects were 0.3-0.8 (z 45-240), all at p = 1/20.

z says whether a gene's effect is larger than null weights' effects through the same gene;
a strong weight can make almost every gene pass that. `specificity` says how much of the
weight's gene effects the gene carries, compared with the other ranked genes of the same
candidate on the same cells:

    specificity(g) = effect(g) / sum_h |effect(h)|      (h: the candidate's ranked genes)

of the ranking measure's `effect` (`path_effect` here), so in [-1, 1]: 1 when g carries all
of it, about 1/n_ranked for every gene when the effect is spread evenly over n_ranked genes,
negative when the weight's action at g raises log p. The null weights' own rankings
(`null_gene_effects.tsv`) score each null weight against the other n_null - 1 the same way,
for calibrated enrichment downstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from .channels import Channel, select_channels, with_nulls
from .editing import evaluation, read_table
from .errors import UserError
from .model.finetuned import load_test_cells
from .model.scgpt import ScGPTModel
from .outputs import named_paths, write_json, write_tsv
from .scores import CellTypeScore
from .settings import GeneEffectSettings

log = logging.getLogger(__name__)

MEASURES = ("path", "logp", "act")
"""`path`: the weight's Δ log p(true type) through the gene's token; `logp`: the part of it
that needs the gene; `act`: the gene's share of the super activation. The ranking is by
`path`."""
STAT_COLUMNS = ("effect", "se", "null_mean", "null_sd", "z", "p_null", "q")
GENE_COLUMNS = ["candidate", "confirmed", "module", "layer", "row", "col", "gene", "n_cells",
                "n_donors", *(f"{m}_{s}" for m in MEASURES for s in STAT_COLUMNS), "rank",
                "percentile", "specificity"]  # fmt: skip
"""genes_causal.tsv; `specificity`: the gene's share of the candidate's `path_effect` mass over
its ranked genes (module docstring)."""
NULL_COLUMNS = ["candidate", "confirmed", "null", "null_row", "null_col", "gene", "n_cells",
                "n_donors", "path_effect", "path_z", "logp_effect", "logp_z", "act_effect",
                "act_z"]  # fmt: skip
"""null_gene_effects.tsv: null weight `null` (1..n_null) scored like the candidate against
the other null weights, on the candidate's ranked genes, by `path_z` within each null."""
OUTPUT_TABLES = ("genes_causal", "null_gene_effects")
OUTPUT_FILES = {name: f"{name}.tsv" for name in OUTPUT_TABLES} | {"summary": "summary.json"}
METHOD = (
    "exact interventions: the weight kept at one gene token and pruned at the others (path); "
    "each cell run whole and without each of its max_genes most expressed gene tokens, copies "
    "stacked in one batch (logp, act)"
)


@dataclass
class GeneEffectResult:
    """Tables of the causal gene effects (see `write_outputs` for the files)."""

    genes_causal: pd.DataFrame
    null_gene_effects: pd.DataFrame
    summary: dict


@dataclass
class TokenEffects:
    """Per (cell, chosen gene) pair: `cell` (index into the cells), `gene` (token id) and,
    per channel, `path`, `logp` and `act` effects [1 + n_null, pairs] (row 0: the
    candidate)."""

    cell: np.ndarray
    gene: np.ndarray
    path: dict[str, np.ndarray]
    logp: dict[str, np.ndarray]
    act: dict[str, np.ndarray]


# --- the copies ---------------------------------------------------------------------------


def chosen_tokens(values: Tensor, padding_mask: Tensor, max_genes: int) -> Tensor:
    """Positions of a cell's gene tokens to ablate: its `max_genes` largest values (0 =
    all), ties by position, in position order. Position 0 (`<cls>`) is never chosen."""
    real = (~padding_mask.bool()).nonzero().squeeze(1)
    real = real[real > 0]
    if max_genes and len(real) > max_genes:
        order = torch.sort(-values[real].double(), stable=True).indices[:max_genes]
        real = torch.sort(real[order]).values
    return real


def cell_copies(
    batch: Mapping[str, Tensor], cell: int, positions: Tensor, pad_token_id: int, pad_value: float
) -> dict[str, Tensor]:
    """Cell `cell` of `batch` whole (copy 0), then without the token at each of `positions`
    (copy k: `positions[k - 1]` removed): [1 + len(positions), L] tensors, the remaining
    tokens kept in order and the padding after them (as `Collate` makes it)."""
    ids, values = batch["gene_ids"][cell], batch["values"][cell]
    pad = batch["padding_mask"][cell].bool()
    n = len(positions) + 1
    drop = pad.repeat(n, 1)
    drop[torch.arange(1, n, device=drop.device), positions] = True
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    mask = drop.gather(1, order)
    copies = {
        "gene_ids": ids[order].masked_fill(mask, pad_token_id),
        "values": values[order].masked_fill(mask, pad_value),
        "padding_mask": mask,
    }
    if "labels" in batch:
        copies["labels"] = batch["labels"][cell].repeat(n)
    return copies


def _stack(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Copies of several cells as one batch, cut to the longest one."""
    width = max(int((~p["padding_mask"]).sum(1).max()) for p in parts)
    out = {}
    for key in parts[0]:
        tensors = [p[key][:, :width] if p[key].dim() == 2 else p[key] for p in parts]
        out[key] = torch.cat(tensors)
    return out


def copy_batches(batches, max_genes: int, batch_size: int, pad_token_id: int, pad_value: float):
    """(copy batches, cell index [copies], removed gene token id [copies], -1 for a whole
    cell) of the cells of `batches`, at most `batch_size` copies per batch, but a cell's
    copies never split."""
    out, cells, genes, parts, size, index = [], [], [], [], 0, 0
    for batch in batches:
        for cell in range(len(batch["gene_ids"])):
            positions = chosen_tokens(batch["values"][cell], batch["padding_mask"][cell],
                                      max_genes)  # fmt: skip
            copies = cell_copies(batch, cell, positions, pad_token_id, pad_value)
            if parts and size + len(positions) + 1 > batch_size:
                out.append(_stack(parts))
                parts, size = [], 0
            parts.append(copies)
            size += len(positions) + 1
            cells += [index] * (len(positions) + 1)
            removed = batch["gene_ids"][cell][positions].cpu().tolist()
            genes += [-1, *removed]
            index += 1
    if parts:
        out.append(_stack(parts))
    return out, np.array(cells, dtype=np.int64), np.array(genes, dtype=np.int64)


# --- the effects --------------------------------------------------------------------------


class _Activations:
    """Forward hooks keeping, while `active`, per channel: sum_t |y_t[r]| of the module's
    output over each sequence's real tokens [1 + n_null, B], for the candidate's row and each
    null's row, on the one batch of `score`."""

    def __init__(self, model: ScGPTModel, channels: Sequence[Channel]):
        self.values: dict[str, Tensor] = {}
        self.score: CellTypeScore | None = None
        self.active = False
        modules = dict(model.named_modules())
        self.handles = []
        for c in channels:
            rows = torch.tensor([c.row, *(r for r, _ in c.nulls)])
            hook = self._hook(c.candidate, rows)
            self.handles.append(modules[c.module].register_forward_hook(hook))

    def _hook(self, name: str, rows: Tensor):
        def hook(module, args, output):
            if not self.active:
                return
            channels = output[..., rows.to(output.device)].double()
            packing = self.score.packings[0]
            if packing is not None:
                channels = packing.unpack(channels)
            pad = self.score.padding_masks[0].bool()[..., None]
            self.values[name] = channels.abs().masked_fill(pad, 0.0).sum(dim=1).T.cpu()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def token_effects(
    model: ScGPTModel,
    batches: Sequence[Mapping[str, Tensor]],
    channels: Sequence[Channel],
    max_genes: int,
    batch_size: int = 64,
    packed: bool | None = None,
) -> TokenEffects:
    """Each channel's `logp` and `act` effects (module docstring) of removing each chosen gene
    token of each cell of `batches` (labelled, position 0 `<cls>`), for the candidate and its
    null weights (`channels` with their `nulls`). The model is left as it was."""
    config = model.config
    copies, cells, genes = copy_batches(batches, max_genes, batch_size, config.pad_token_id,
                                        config.pad_value)  # fmt: skip
    if not (genes >= 0).any():
        raise UserError("the cells carry no gene tokens to ablate")
    drops = {c.candidate: [] for c in channels}
    peaks = {c.candidate: [] for c in channels}
    with evaluation(model):
        recorder = _Activations(model, channels)
        try:
            for batch in copies:
                score = recorder.score = CellTypeScore(model, [batch], packed=packed)
                recorder.active = True
                base = score(model)
                recorder.active = False
                for c in channels:
                    pruned = score.zeroed_scores(model, c.module, [(c.row, c.col), *c.nulls])
                    drops[c.candidate].append((base[None] - pruned).numpy())
                    peaks[c.candidate].append(recorder.values[c.candidate].numpy())
        finally:
            recorder.close()
    whole = np.flatnonzero(genes < 0)  # each copy's whole cell: its cell's first copy
    whole = whole[np.searchsorted(whole, np.arange(len(genes)), side="right") - 1]
    pair = np.flatnonzero(genes >= 0)
    effects = {"path": path_effects(model, batches, channels, max_genes)}
    for name, per_batch in (("logp", drops), ("act", peaks)):
        effects[name] = {}
        for c in channels:
            values = np.concatenate(per_batch[c.candidate], axis=1)
            effects[name][c.candidate] = values[:, whole[pair]] - values[:, pair]
    return TokenEffects(cells[pair], genes[pair], effects["path"], effects["logp"],
                        effects["act"])  # fmt: skip


def path_effects(model: ScGPTModel, batches, channels: Sequence[Channel], max_genes: int):
    """Per channel, the `path` effects [1 + n_null, pairs] (module docstring) of the cells of
    `batches` at their chosen gene tokens, pairs in `copy_batches`' order (cell by cell,
    tokens in position order)."""
    chosen = [chosen_tokens(b["values"][i], b["padding_mask"][i], max_genes)
              for b in batches for i in range(len(b["gene_ids"]))]  # fmt: skip
    width = max((len(t) for t in chosen), default=0)
    tokens = torch.full((len(chosen), max(width, 1)), -1, dtype=torch.long)
    for i, t in enumerate(chosen):
        tokens[i, : len(t)] = t.cpu()
    valid = (tokens >= 0).numpy()
    out = {}
    with evaluation(model):
        score = CellTypeScore(model, list(batches), packed=False)
        for c in channels:
            effects = score.path_effects(model, c.module, [(c.row, c.col), *c.nulls], tokens)
            out[c.candidate] = effects.numpy()[:, valid]
    return out


# --- aggregation and scores ---------------------------------------------------------------


def donor_means(effects: np.ndarray, cells: np.ndarray, genes: np.ndarray, donors: np.ndarray):
    """Per gene: (gene ids, n_cells, n_donors, mean of donor means [K, genes], standard error
    of the donor means [K, genes]) of `effects` [K, pairs]; a donor's mean is over its
    cells in which the gene was evaluated. NaN se where a gene has one donor."""
    frame = pd.DataFrame(effects.T)
    keys = pd.DataFrame({"gene": genes, "donor": donors[cells]})
    by_donor = frame.groupby([keys["gene"], keys["donor"]], sort=True).mean()
    by_gene = by_donor.groupby(level="gene", sort=True)
    n_cells = keys.groupby("gene", sort=True).size().to_numpy()
    n_donors = by_gene.size().to_numpy()
    mean = by_gene.mean().to_numpy().T
    se = (by_gene.std(ddof=1) / np.sqrt(n_donors)[:, None]).to_numpy().T
    return by_gene.size().index.to_numpy(), n_cells, n_donors, mean, se


def null_scores(values: np.ndarray) -> dict[str, np.ndarray]:
    """z, p_null, null_mean and null_sd of row 0 of `values` [1 + n_null, genes] against the
    other rows (module docstring); z NaN where the null sd is 0."""
    own, nulls = values[0], values[1:]
    mean, sd = nulls.mean(axis=0), nulls.std(axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sd > 0, (own - mean) / sd, np.nan)
    p = (1 + (nulls >= own).sum(axis=0)) / (len(nulls) + 1)
    return {"z": z, "p_null": p, "null_mean": mean, "null_sd": sd}


def specificity(effects: np.ndarray) -> np.ndarray:
    """Each gene's share of the candidate's gene-effect mass: effect / sum |effect| over the
    ranked genes (module docstring); NaN where every effect is 0."""
    effects = np.asarray(effects, dtype=np.float64)
    mass = np.abs(effects).sum()
    return effects / mass if mass > 0 else np.full(len(effects), np.nan)


def _bh(p: np.ndarray) -> np.ndarray:
    return stats.false_discovery_control(p, method="bh") if len(p) else p


def score_genes(effects: TokenEffects, channel: Channel, donors: np.ndarray, gene_names,
                min_cells: int) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(`GENE_COLUMNS` rows of the candidate's ranked genes by rank, `NULL_COLUMNS` rows of
    its null weights' rankings of the same genes)."""
    values = {m: getattr(effects, m)[channel.candidate] for m in MEASURES}
    return rank_genes(values, effects.cell, effects.gene, channel, donors, gene_names,
                      min_cells, GENE_COLUMNS, NULL_COLUMNS)  # fmt: skip


def by_rank(frame: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Gene rows in ranking order by `measure`: the smallest `<measure>_p_null` first, then
    the larger `<measure>_effect`, then the gene's name (module docstring)."""
    return frame.sort_values([f"{measure}_p_null", f"{measure}_effect", "gene"],
                             ascending=[True, False, True], kind="stable")  # fmt: skip


def rank_genes(
    values: Mapping[str, np.ndarray],
    cells: np.ndarray,
    genes: np.ndarray,
    channel: Channel,
    donors: np.ndarray,
    gene_names,
    min_cells: int,
    gene_columns: Sequence[str],
    null_columns: Sequence[str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A candidate's gene ranking and its null weights' rankings from per-pair effects.

    `values`: per measure, effects [1 + n_null, pairs] (row 0: the candidate, then its null
    weights in `channel.nulls` order) of the (cell, gene id) pairs `cells`, `genes`; the
    first measure ranks and gives `specificity`. Donor means, null scores and BH q as the
    module docstring says;
    returns (`gene_columns` rows by rank, `null_columns` rows of each null weight scored
    against the others on the same ranked genes).
    """
    name, measures = channel.candidate, list(values)
    first = measures[0]
    columns, nulls = {}, {}
    for measure in measures:
        ids, n_cells, n_donors, mean, se = donor_means(values[measure], cells, genes, donors)
        scores = null_scores(mean)
        columns |= {f"{measure}_effect": mean[0], f"{measure}_se": se[0]}
        columns |= {f"{measure}_{k}": v for k, v in scores.items()}
        nulls[measure] = mean[1:]
    names = np.array([gene_names(int(i)) for i in ids], dtype=object)
    frame = pd.DataFrame({"gene": names, "n_cells": n_cells,
                          "n_donors": n_donors, **columns})  # fmt: skip
    keep = (frame["n_cells"] >= min_cells).to_numpy() & np.isfinite(frame[f"{first}_z"].to_numpy())
    frame = frame[keep].assign(**{f"{m}_q": np.nan for m in measures})
    for measure in measures:
        frame[f"{measure}_q"] = _bh(frame[f"{measure}_p_null"].to_numpy())
    frame = by_rank(frame, first)
    n = len(frame)
    frame["rank"] = np.arange(1, n + 1)
    frame["percentile"] = 100.0 * (n - frame["rank"]) / (n - 1) if n > 1 else 100.0
    frame["specificity"] = specificity(frame[f"{first}_effect"].to_numpy())
    where = {"candidate": name, "confirmed": channel.confirmed, "module": channel.module,
             "layer": channel.layer, "row": channel.row, "col": channel.col}  # fmt: skip
    ranked = frame.assign(**where)[list(gene_columns)].reset_index(drop=True)
    null_rows = []
    kept = np.flatnonzero(keep)
    for j, (row, col) in enumerate(channel.nulls):
        own = {}
        for measure in measures:
            draws = nulls[measure][:, kept]
            order = [j, *(k for k in range(len(draws)) if k != j)]
            own[f"{measure}_effect"] = draws[j]
            own[f"{measure}_z"] = null_scores(draws[order])["z"]
        table = pd.DataFrame({"gene": names[kept], **own})
        table = table.assign(n_cells=n_cells[kept], n_donors=n_donors[kept], null=j + 1,
                             null_row=row, null_col=col, candidate=name,
                             confirmed=channel.confirmed)  # fmt: skip
        null_rows.append(table.sort_values([f"{first}_z", "gene"], ascending=[False, True]))
    return ranked, _concat(null_rows, list(null_columns))


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


# --- entry points -------------------------------------------------------------------------


def causal_gene_effects(
    model: ScGPTModel,
    batches: Sequence[Mapping[str, Tensor]],
    channels: Sequence[Channel],
    vocab: Mapping[str, int],
    settings: GeneEffectSettings,
    obs: pd.DataFrame | None = None,
    drawn_nulls: pd.DataFrame | None = None,
    packed: bool | None = None,
) -> GeneEffectResult:
    """The causal gene rankings of `channels` on the cells of `batches` (labelled; `obs`: their
    metadata in batch order, whose `donor` column groups them; without it each cell is its
    own donor). `drawn_nulls`: ablate's nulls.tsv (`channels.with_nulls`)."""
    started = time.perf_counter()
    n_cells = sum(len(b["gene_ids"]) for b in batches)
    if obs is not None and len(obs) != n_cells:
        raise ValueError(f"obs has {len(obs)} rows for {n_cells} cells")
    if obs is not None and "donor" in obs.columns:
        donors = obs["donor"].astype(str).to_numpy()
    else:
        log.warning("no obs column 'donor': each cell counts as its own donor")
        donors = np.array([f"cell{i}" for i in range(n_cells)])
    channels = with_nulls(model, channels, settings.n_null, settings.band, settings.seed,
                          drawn_nulls)  # fmt: skip
    id_to_gene = {i: g for g, i in vocab.items()}
    effects = None
    if channels:
        log.info("causal gene effects: %d candidate(s), %d cells, up to %d genes per cell, %d "
                 "null weights", len(channels), n_cells, settings.max_genes,
                 settings.n_null)  # fmt: skip
        effects = token_effects(model, batches, channels, settings.max_genes,
                                settings.batch_size, packed)  # fmt: skip
    tables, null_tables, summaries = rank_channels(
        channels,
        lambda c: score_genes(effects, c, donors, lambda i: id_to_gene.get(i, str(i)),
                              settings.min_cells),
        MEASURES,
    )  # fmt: skip
    summary = {
        "method": METHOD,
        "n_cells": n_cells,
        "n_donors": len(set(donors)),
        "n_pairs": 0 if effects is None else len(effects.gene),
        "n_genes": 0 if effects is None else len(np.unique(effects.gene)),
        "candidates": summaries,
        "seconds": round(time.perf_counter() - started, 3),
        "settings": asdict(settings),
    }
    return GeneEffectResult(_concat(tables, GENE_COLUMNS), _concat(null_tables, NULL_COLUMNS),
                            summary)  # fmt: skip


def rank_channels(channels, rank, measures: tuple[str, ...]):
    """(gene tables, null tables, summaries) of `channels`, each ranked by `rank(channel)`
    -> (genes, nulls); a summary counts the genes at q <= 0.05 of each of `measures`."""
    tables, null_tables, summaries = [], [], []
    for c in channels:
        genes, nulls = rank(c)
        tables.append(genes)
        null_tables.append(nulls)
        summaries.append(
            {**c.row_dict(), "n_ranked": len(genes), "top_genes": genes["gene"].head(10).tolist()}
            | {f"n_{m}_q05": int((genes[f"{m}_q"] <= 0.05).sum()) for m in measures}
        )
    return tables, null_tables, summaries


def gene_effects(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    candidates: pd.DataFrame | str | Path,
    settings: GeneEffectSettings,
    nulls: pd.DataFrame | str | Path | None = None,
    n_unconfirmed: int = 0,
    device: str | torch.device | None = None,
) -> GeneEffectResult:
    """Causal gene effects of the confirmed candidates (and the `n_unconfirmed` strongest
    others, as `channels.select_channels` picks them) of a fine-tuned checkpoint, on (up to
    `max_cells`) cells of `settings.split`, against the confirmation's null draws (`nulls`:
    ablate's nulls.tsv) where given."""
    test = load_test_cells(
        tokenised, checkpoint, batch_size=settings.batch_size, seed=settings.seed,
        max_cells=settings.max_cells, device=device, split=settings.split,
    )  # fmt: skip
    channels = select_channels(test.model, candidates, n_unconfirmed)
    drawn = None
    if nulls is not None:
        drawn = read_table(nulls, "null draws table", ("candidate", "row", "col"),
                           "ablate's nulls.tsv has them")  # fmt: skip
    return causal_gene_effects(test.model, test.batches, channels, test.vocab, settings,
                               test.obs, drawn)  # fmt: skip


def write_outputs(result: GeneEffectResult, outputs) -> list[Path]:
    """Write genes_causal.tsv, null_gene_effects.tsv and summary.json, each atomically.

    `outputs`: a folder or the rule's named outputs (`named_paths`).
    """
    paths = named_paths(outputs, OUTPUT_FILES)
    tables = [write_tsv(paths[name], getattr(result, name)) for name in OUTPUT_TABLES]
    return [*tables, write_json(paths["summary"], result.summary)]


def run(inputs, outputs, settings: GeneEffectSettings, *, n_unconfirmed: int = 0):
    """The causal gene stage of a fine-tuned classifier: `gene_effects` of
    `inputs["candidates"]` of `inputs["checkpoint"]` on `inputs["data"]`, against
    `inputs["nulls"]` where given; write the tables (`write_outputs`) to `outputs`. The
    starting model's counterpart is `gene_effects_base.run`."""
    result = gene_effects(
        inputs["data"], inputs["checkpoint"], inputs["candidates"], settings,
        nulls=inputs.get("nulls"), n_unconfirmed=n_unconfirmed,
    )  # fmt: skip
    write_outputs(result, outputs)
    return result
