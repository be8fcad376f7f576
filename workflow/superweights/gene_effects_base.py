"""Causal gene effects of a super weight in the starting (base) model, under the masked-expression
objective.

The half of the causal gene map that `gene_effects` does for the fine-tuned classifier, for the
checkpoint fine-tuning starts from (released or pretrained here), judged as the base
confirmation judges it (`scores.MaskedExpressionScore`): a seeded share `mask_ratio` of each
cell's gene positions is hidden (value -1) and the expression decoder predicts them; with `v`
the true value, `e` the prediction and `s2` the unedited model's residual variance (fixed at
construction), the Gaussian log-likelihood of masked gene g of cell c is

    l(c, g) = -1/2 (log(2 pi s2) + (e - v)^2 / s2).

No token is removed: the masked positions themselves are the genes. For a candidate
`w = W[row, col]` of a down-projection and each masked position,

    expr_effect(c, g) = l(c, g) - l(c, g | w = 0) = ((e' - v)^2 - (e - v)^2) / (2 s2),

positive where the weight helps predict g's expression (e': the prediction with w pruned; the
squared-error change scaled by 1/(2 s2), so a squared-error ranking is the same). All masked
positions of a batch come from one pass with the weight and one stacked pass per pruned weight
from layer l + 1 on (`zeroed_scores`, the path the confirmation's null draws take).

Per donor, a gene's effect is the mean over the donor's cells in which it was masked; per gene,
the mean of the donor means, with `n_cells` (cells where g was masked), `n_donors` and `se`.
The candidate's magnitude-matched null weights (the base confirmation's `kind == "magnitude"`
draws, `channels.with_nulls`) are scored on the same cells and the same masks, and z, the
one-sided empirical p, BH q, the rank and the null weights' own rankings follow exactly as in
`gene_effects` (`gene_effects.rank_genes`); rank 1 is the smallest `expr_p_null`, ties by
the larger `expr_effect`. `specificity` is the gene's share of the candidate's expression-effect
mass, `expr_effect(g) / sum_h |expr_effect(h)|` over its ranked genes (as `gene_effects`
defines it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .channels import Channel, select_channels, with_nulls
from .editing import evaluation, read_table
from .gene_effects import (
    GeneEffectResult,
    GeneEffectSettings,
    _concat,
    rank_channels,
    rank_genes,
    write_outputs,
)
from .model.finetuned import load_test_cells
from .model.scgpt import ScGPTModel
from .scores import MaskedExpressionScore, full_precision

log = logging.getLogger(__name__)

MEASURES = ("expr",)
"""`expr`: the weight's share of the masked gene's expression log-likelihood."""
STAT_COLUMNS = ("effect", "se", "null_mean", "null_sd", "z", "p_null", "q")
GENE_COLUMNS = ["candidate", "confirmed", "module", "layer", "row", "col", "gene", "n_cells",
                "n_donors", *(f"{m}_{s}" for m in MEASURES for s in STAT_COLUMNS), "rank",
                "percentile", "specificity"]  # fmt: skip
"""genes_causal.tsv of the base model; `n_cells`: cells in which the gene was masked;
`specificity`: the gene's share of the candidate's `expr_effect` mass over its ranked genes."""
NULL_COLUMNS = ["candidate", "confirmed", "null", "null_row", "null_col", "gene", "n_cells",
                "n_donors", "expr_effect", "expr_z"]  # fmt: skip
"""null_gene_effects.tsv of the base model: each null weight scored against the others."""
METHOD = (
    "masked-expression objective: per masked gene position, the Gaussian log-likelihood of "
    "its value with the weight minus with the weight pruned, on the same seeded masks"
)


class MaskedPositionScore(MaskedExpressionScore):
    """`MaskedExpressionScore` per position: a call returns the Gaussian log-likelihood of every
    position of every cell, batch by batch, each batch's [B, L] flattened (0 where nothing
    is masked), so that `zeroed_scores` gives [conditions, positions]. `masked()` says which
    entries are masked positions and whose."""

    def per_cell(self, model, hidden, start, batch, packing):
        hidden = model.encode(hidden, batch["padding_mask"], start, packing=packing)
        with full_precision(hidden.device):
            expr = model.decoder(hidden.to(model.decoder.fc[0].weight.dtype))
        if packing is not None:
            expr = packing.unpack(expr)
        squared = (expr.double() - batch["values"].double()) ** 2
        loglik = -0.5 * (math.log(2 * math.pi * self.variance) + squared / self.variance)
        return loglik.masked_fill(~batch["mask"].bool(), 0.0).flatten()

    def masked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entries of the flattened output that are masked positions, their cell (index over
        the batches' cells in order), their gene token id)."""
        entries, cells, genes = [], [], []
        offset = cell = 0
        for b in self.batches:
            mask = b["mask"].bool().cpu()
            rows, cols = mask.nonzero(as_tuple=True)
            entries.append(offset + rows * mask.shape[1] + cols)
            cells.append(cell + rows)
            genes.append(b["gene_ids"].cpu()[rows, cols])
            offset += mask.numel()
            cell += mask.shape[0]
        return tuple(torch.cat(t).numpy().astype(np.int64) for t in (entries, cells, genes))


@dataclass
class PositionEffects:
    """Per masked position: `cell` (index into the cells), `gene` (token id) and, per channel,
    `expr` effects [1 + n_null, positions] (row 0: the candidate)."""

    cell: np.ndarray
    gene: np.ndarray
    expr: dict[str, np.ndarray]


def position_effects(
    model: ScGPTModel,
    batches: Sequence[Mapping[str, Tensor]],
    channels: Sequence[Channel],
    mask_ratio: float = 0.15,
    seed: int = 0,
    packed: bool | None = None,
) -> PositionEffects:
    """Each channel's `expr` effect (module docstring) at every masked position of the cells of
    `batches` (masks seeded by `seed` as the confirmation seeds them), for the candidate and its
    null weights (`channels` with their `nulls`). The model is left as it was."""
    with evaluation(model):
        score = MaskedPositionScore(model, list(batches), mask_ratio, seed, packed=packed)
        entries, cells, genes = score.masked()
        if not len(entries):
            raise ValueError("no gene position is masked: the cells are too short for mask_ratio")
        whole = score(model).numpy()[entries]
        expr = {}
        for c in channels:
            pruned = score.zeroed_scores(model, c.module, [(c.row, c.col), *c.nulls])
            expr[c.candidate] = whole[None] - pruned.numpy()[:, entries]
    return PositionEffects(cells, genes, expr)


def base_causal_gene_effects(
    model: ScGPTModel,
    batches: Sequence[Mapping[str, Tensor]],
    channels: Sequence[Channel],
    vocab: Mapping[str, int],
    settings: GeneEffectSettings,
    mask_ratio: float = 0.15,
    obs: pd.DataFrame | None = None,
    drawn_nulls: pd.DataFrame | None = None,
    packed: bool | None = None,
) -> GeneEffectResult:
    """The causal gene rankings of `channels` under the masked-expression objective on the
    cells of `batches` (`obs`: their metadata in batch order, whose `donor` column groups
    them; without it each cell is its own donor). `drawn_nulls`: the base confirmation's
    nulls.tsv. Of `settings`, `max_genes` does not apply (every masked position counts) and
    `batch_size` is cells per pass."""
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
        log.info("base causal gene effects: %d candidate(s), %d cells, mask ratio %g, %d null "
                 "weights", len(channels), n_cells, mask_ratio, settings.n_null)  # fmt: skip
        effects = position_effects(model, batches, channels, mask_ratio, settings.seed, packed)
    tables, null_tables, summaries = rank_channels(
        channels,
        lambda c: rank_genes({"expr": effects.expr[c.candidate]}, effects.cell, effects.gene, c,
                             donors, lambda i: id_to_gene.get(i, str(i)), settings.min_cells,
                             GENE_COLUMNS, NULL_COLUMNS),
        ("expr",),
    )  # fmt: skip
    summary = {
        "method": METHOD,
        "mask_ratio": mask_ratio,
        "n_cells": n_cells,
        "n_donors": len(set(donors)),
        "n_positions": 0 if effects is None else len(effects.gene),
        "n_genes": 0 if effects is None else len(np.unique(effects.gene)),
        "candidates": summaries,
        "seconds": round(time.perf_counter() - started, 3),
        "settings": asdict(settings),
    }
    return GeneEffectResult(_concat(tables, GENE_COLUMNS), _concat(null_tables, NULL_COLUMNS),
                            summary)  # fmt: skip


def base_gene_effects(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    candidates: pd.DataFrame | str | Path,
    settings: GeneEffectSettings,
    nulls: pd.DataFrame | str | Path | None = None,
    n_unconfirmed: int = 0,
    mask_ratio: float = 0.15,
    device: str | torch.device | None = None,
) -> GeneEffectResult:
    """Causal gene effects, under the masked-expression objective, of the base confirmation's
    confirmed candidates (and the `n_unconfirmed` strongest others, as
    `channels.select_channels` picks them) of a starting checkpoint (no classifier needed), on
    (up to `max_cells`) cells of `settings.split`, against the confirmation's null draws
    (`nulls`: the base confirmation's nulls.tsv) where given. An empty candidates table gives
    empty tables."""
    table = candidates
    if not isinstance(table, pd.DataFrame):
        table = pd.read_csv(table, sep="\t")
    cells = load_test_cells(
        tokenised, checkpoint, batch_size=settings.batch_size, seed=settings.seed,
        max_cells=settings.max_cells, device=device, split=settings.split, labelled=False,
    )  # fmt: skip
    if table.empty:
        log.warning("the base confirmation has no candidate: nothing to rank")
        channels = []
    else:
        channels = select_channels(cells.model, table, n_unconfirmed)
    drawn = None
    if nulls is not None:
        drawn = read_table(nulls, "null draws table", ("candidate", "row", "col"),
                           "the confirmation's nulls.tsv has them")  # fmt: skip
    return base_causal_gene_effects(cells.model, cells.batches, channels, cells.vocab, settings,
                                    mask_ratio, cells.obs, drawn)  # fmt: skip


def run(
    inputs, outputs, settings: GeneEffectSettings, *, n_unconfirmed: int = 0,
    mask_ratio: float = 0.15,
) -> GeneEffectResult:  # fmt: skip
    """The causal gene stage of a starting checkpoint: `base_gene_effects` of
    `inputs["candidates"]` of `inputs["checkpoint"]` on `inputs["data"]` with `mask_ratio` of
    each cell's genes masked, against `inputs["nulls"]` where given; write the tables
    (`gene_effects.write_outputs`) to `outputs`."""
    result = base_gene_effects(
        inputs["data"], inputs["checkpoint"], inputs["candidates"], settings,
        nulls=inputs.get("nulls"), n_unconfirmed=n_unconfirmed, mask_ratio=mask_ratio,
    )  # fmt: skip
    write_outputs(result, outputs)
    return result
