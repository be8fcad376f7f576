"""The super-weight probe on an scGPT model, with cells as prompts.

A stratified sample of cells (up to `cells_per_type` per `obs["cell_type"]`, from the chosen
splits) is tokenised as in training and run through `find_super_weights` once. Then each
cell is looked at on its own: hooks on every down-projection record, per cell and layer,
where the largest |input| and |output| sit (token, channel) and how far above that cell's
median |x| they are. A candidate `W[row, col]` is summarised by the cells (and cell types)
whose input spike sits on channel `col` and output spike on channel `row` at one token, and
by the genes of those tokens (`<cls>` is a token like any other). Candidates found in a
later round are looked at with the earlier rounds' weights zeroed, as the probe saw them.
A row's `cell_id`, `token` and `token_gene` locate its output spike (the candidate's token).

Outputs (`write_outputs`): `candidates.tsv` (accepted candidates, topped up with the
strongest spikes of other layers, `accepted` False, up to `n_strongest` rows), `layers.tsv`
(the probe's per-round layer statistics), `layernorm.tsv` (LayerNorm gain outliers,
secondary candidates), `cells.tsv` (per cell and layer spike ratios) and `summary.json`.
"""

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .data.preprocess import read_tokenised
from .editing import evaluation, layer_of, zeroed
from .errors import UserError
from .model.args import CellCut, cell_cut
from .model.cells import cell_batches
from .model.checkpoint import load_checkpoint, pick_device
from .model.scgpt import ScGPTModel
from .outputs import named_paths, write_json, write_tsv
from .probe import ProbeResult, down_projections, find_super_weights, layernorm_outliers
from .settings import SPLITS, ProbeSettings

TOP_GENES = 5
SECONDARY = "secondary candidate: LayerNorm gain outlier"
CANDIDATE_COLUMNS = [
    "module", "layer", "row", "col", "weight", "rank", "input_value", "output_value",
    "input_ratio", "output_ratio", "contribution", "weight_ratio", "token_ratio", "cell_id",
    "cell_type", "token", "token_gene", "round",
    "accepted", "reason", "n_cells_same_channel", "n_cells", "n_cell_types_same_channel",
    "n_cell_types", "top_genes",
]  # fmt: skip
CELL_COLUMNS = [
    "cell_id", "cell_type", "split", "layer", "input_ratio", "output_ratio", "input_max",
    "output_max", "input_channel", "output_channel", "output_gene",
]  # fmt: skip
OUTPUT_TABLES = ("candidates", "layers", "layernorm", "cells")
OUTPUT_FILES = {name: f"{name}.tsv" for name in OUTPUT_TABLES} | {"summary": "summary.json"}


@dataclass
class ScgptProbe:
    """The probe's result and the per-cell view of it (tables as written by `write_outputs`)."""

    probe: ProbeResult
    candidates: pd.DataFrame
    layers: pd.DataFrame
    layernorm: pd.DataFrame
    cells: pd.DataFrame
    summary: dict


@dataclass
class _Cells:
    """The sampled cells: batches on the model's device and each cell's gene tokens."""

    obs: pd.DataFrame
    batches: list[dict[str, Tensor]]
    genes: list[np.ndarray]
    names: dict[int, str]

    def gene(self, cell: int, token: int) -> str:
        return self.names[int(self.genes[cell][token])]


def sample_cells(obs: pd.DataFrame, settings: ProbeSettings) -> np.ndarray:
    """Row positions of up to `cells_per_type` cells per label from the chosen splits.

    Seeded; grouped by label (category order), in data order within a label.
    """
    splits = settings.splits or SPLITS
    eligible = obs["split"].astype(str).isin(splits).to_numpy()
    labels = obs["cell_type"].astype("category")
    rng = np.random.default_rng(settings.seed)
    picked = []
    for label in labels.cat.categories:
        rows = np.flatnonzero(eligible & (labels == label).to_numpy())
        if rows.size > settings.cells_per_type:
            rows = np.sort(rng.choice(rows, settings.cells_per_type, replace=False))
        picked.append(rows)
    positions = np.concatenate(picked) if picked else np.array([], dtype=np.int64)
    if positions.size == 0:
        raise UserError(f"no cells in split(s) {list(splits)} to probe; check probe.splits")
    return positions


def _prepare(model, adata: ad.AnnData, vocab: dict[str, int], settings, cut: CellCut) -> _Cells:
    positions = sample_cells(adata.obs, settings)
    batches = cell_batches(
        adata, vocab, positions, pad_token_id=model.config.pad_token_id,
        batch_size=settings.batch_size, max_seq_len=cut.max_seq_len, seed=cut.seed,
        labelled=False, device=next(model.parameters()).device,
    )  # fmt: skip
    obs = adata.obs.iloc[positions][["cell_type", "split"]].astype(str)
    genes = [
        ids[~pad].cpu().numpy()
        for b in batches
        for ids, pad in zip(b["gene_ids"], b["padding_mask"], strict=True)
    ]
    return _Cells(obs, batches, genes, {i: g for g, i in vocab.items()})


def _per_cell(x: Tensor, pad: Tensor) -> Tensor:
    """Per cell [B, 5]: max |x| over non-pad tokens, its signed value, token, channel, median.

    The median is of the cell's non-zero |x| at non-pad tokens (NaN when there are none).
    """
    B, L, H = x.shape
    a = x.detach().float().abs().masked_fill(pad[..., None], 0.0).reshape(B, -1)
    peak, where = a.max(1)
    value = x.detach().float().reshape(B, -1).gather(1, where[:, None])[:, 0]
    median = a.masked_fill(a == 0, math.nan).nanmedian(1).values
    parts = [peak, value, where // H, where % H, median]
    return torch.stack([p.double() for p in parts], 1).cpu()


def _cell_spikes(model, cells: _Cells) -> pd.DataFrame:
    """One forward pass; per cell and layer the input and output spike of the down-projection."""
    down = down_projections(model, "scgpt")
    found: dict[int, dict[str, list[Tensor]]] = {layer: {"in": [], "out": []} for layer in down}
    current: dict[str, Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            found[layer]["in"].append(_per_cell(args[0], current["pad"]))
            found[layer]["out"].append(_per_cell(output, current["pad"]))

        return hook

    handles = [module.register_forward_hook(hook_for(layer)) for layer, (_, module) in down.items()]
    try:
        with evaluation(model):
            for batch in cells.batches:
                current["pad"] = batch["padding_mask"]
                model(batch["gene_ids"], batch["values"], batch["padding_mask"])
    finally:
        for handle in handles:
            handle.remove()
    frames = []
    for layer, parts in found.items():
        frame = {"cell": np.arange(len(cells.genes)), "layer": layer}
        for part, rows in parts.items():
            stats = torch.cat(rows).numpy()
            for i, key in enumerate(("max", "value", "token", "channel", "median")):
                frame[f"{part}_{key}"] = stats[:, i]
        frames.append(pd.DataFrame(frame))
    spikes = pd.concat(frames, ignore_index=True)
    for col in ("in_token", "in_channel", "out_token", "out_channel"):
        spikes[col] = spikes[col].astype(np.int64)
    for part in ("in", "out"):
        spikes[f"{part}_ratio"] = _ratio(spikes[f"{part}_max"], spikes[f"{part}_median"])
    return spikes


def _ratio(peak: pd.Series, median: pd.Series) -> np.ndarray:
    peak, median = peak.to_numpy(), median.fillna(0).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(median > 0, peak / median, np.where(peak > 0, math.inf, 0.0))


def _channel_use(spikes: pd.DataFrame, layer: int, row: int, col: int, cells: _Cells) -> dict:
    """Cells whose input spike is on `col` and output spike on `row` at one token; their genes."""
    s = spikes[spikes["layer"] == layer]
    hit = (s["in_channel"] == col) & (s["out_channel"] == row) & (s["in_token"] == s["out_token"])
    same = s[hit]
    genes = Counter(cells.gene(c, t) for c, t in zip(same["cell"], same["out_token"], strict=True))
    labels = cells.obs["cell_type"].to_numpy()
    return {
        "n_cells_same_channel": len(same),
        "n_cells": len(cells.genes),
        "n_cell_types_same_channel": len(set(labels[same["cell"].to_numpy()])),
        "n_cell_types": len(set(labels)),
        "top_genes": ";".join(f"{g}:{n}" for g, n in genes.most_common(TOP_GENES)),
    }


def _where(cells: _Cells, cell: int, token: int) -> dict:
    return {
        "cell_id": cells.obs.index[cell],
        "cell_type": cells.obs["cell_type"].iloc[cell],
        "token": token,
        "token_gene": cells.gene(cell, token),
    }


def _check_finite(spikes: pd.DataFrame, cells: _Cells, down: dict) -> None:
    """UserError naming the first down-projection whose input or output is NaN or ±inf on a
    probed cell: spike ratios of such activations mean nothing."""
    for part, name in (("in", "input"), ("out", "output")):
        bad = spikes[~np.isfinite(spikes[f"{part}_max"].to_numpy())]
        if len(bad):
            first = bad.iloc[0]
            raise UserError(
                f"non-finite activations (NaN or inf) at the {name} of "
                f"{down[int(first['layer'])][0]} on {bad['cell'].nunique()} probed cell(s), "
                f"e.g. {cells.obs.index[int(first['cell'])]}; the checkpoint or the data "
                "overflow: the probe cannot judge spikes on them"
            )


def _candidate_table(
    model, result: ProbeResult, cells: _Cells, n_strongest: int, first: pd.DataFrame
):
    """Accepted candidates, then the strongest spikes of other layers; and the round-1 spikes
    (`first`, as `_cell_spikes` finds them with no weight zeroed)."""
    rounds = sorted({c.round for c in result.candidates} | {1})
    spikes = {1: first}
    for r in rounds[1:]:
        with zeroed(model, [(c.module, c.row, c.col) for c in result.candidates if c.round < r]):
            spikes[r] = _cell_spikes(model, cells)
    rows = []
    for c in result.candidates:
        row = {k: getattr(c, k) for k in CANDIDATE_COLUMNS if hasattr(c, k)}
        row |= _where(cells, c.item, c.token) | {"accepted": True, "reason": "accepted"}
        rows.append(row | _channel_use(spikes[c.round], c.layer, c.row, c.col, cells))
    taken = {c.layer for c in result.candidates}
    first = result.layers_frame().query("round == 1")
    others = first[~first["layer"].isin(taken)].sort_values("ratio_out", ascending=False)
    modules = dict(model.named_modules())
    first_spikes = spikes[1].set_index(["layer", "cell"])
    for s in others.head(max(n_strongest - len(rows), 0)).itertuples():
        r, c = int(s.row), int(s.col)
        row = {"module": s.module, "layer": s.layer, "row": r, "col": c}
        row["weight"] = float(modules[s.module].weight.detach()[r, c])
        row["input_value"] = s.input_at_spike
        row["output_value"] = first_spikes.loc[(s.layer, s.item_out), "out_value"]
        row |= {"input_ratio": s.ratio_in_at_spike, "output_ratio": s.ratio_out}
        row |= {"weight_ratio": s.weight_ratio, "token_ratio": s.token_ratio}
        row |= {"contribution": s.contribution, "round": 1, "accepted": False}
        row |= _where(cells, int(s.item_out), int(s.token_out)) | {"reason": s.reason}
        rows.append(row | _channel_use(spikes[1], s.layer, r, c, cells))
    table = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS).astype({"accepted": bool})
    table = table.sort_values(["accepted", "output_ratio"], ascending=False, ignore_index=True)
    return table, spikes[1]


def _cell_table(spikes: pd.DataFrame, cells: _Cells) -> pd.DataFrame:
    spikes = spikes.iloc[np.lexsort((spikes["layer"], spikes["cell"]))]
    cell = spikes["cell"].to_numpy()
    genes = [cells.gene(c, t) for c, t in zip(cell, spikes["out_token"], strict=True)]
    return pd.DataFrame(
        {
            "cell_id": cells.obs.index.to_numpy()[cell],
            "cell_type": cells.obs["cell_type"].to_numpy()[cell],
            "split": cells.obs["split"].to_numpy()[cell],
            "layer": spikes["layer"].to_numpy(),
            "input_ratio": spikes["in_ratio"].to_numpy(),
            "output_ratio": spikes["out_ratio"].to_numpy(),
            "input_max": spikes["in_max"].to_numpy(),
            "output_max": spikes["out_max"].to_numpy(),
            "input_channel": spikes["in_channel"].to_numpy(),
            "output_channel": spikes["out_channel"].to_numpy(),
            "output_gene": genes,
        },
        columns=CELL_COLUMNS,
    )


def _layernorm_table(model, z: float) -> pd.DataFrame:
    frame = layernorm_outliers(model, z)
    layer = frame["module"].map(layer_of)
    frame.insert(1, "layer", layer.astype("Int64"))
    frame["kind"] = SECONDARY
    return frame


def _statement(table: pd.DataFrame, n_cells: int, n_types: int, settings, n_ln: int) -> str:
    cohort = f"{n_cells} cells of {n_types} cell type(s)"
    accepted = table[table["accepted"]]
    if len(accepted):
        parts = [
            f"layer {r.layer} W[{r.row}, {r.col}] (input ratio {r.input_ratio:.0f}, output ratio "
            f"{r.output_ratio:.0f}, contribution {r.contribution:.2f}; spikes together in "
            f"{r.n_cells_same_channel} of {r.n_cells} cells and {r.n_cell_types_same_channel} "
            f"of {r.n_cell_types} cell types, most often on token {_top(r.top_genes)})"
            for r in accepted.itertuples()
        ]
        text = (
            f"Found {len(accepted)} candidate(s) in {cohort}: "
            + "; ".join(parts)
            + ". Candidates are spikes, not proof: the ablate stage tests them by pruning."
        )
    else:
        thresholds = (
            f"output ratio ≥ {settings.output_ratio:g} (layer) and {settings.token_ratio:g} "
            f"(token), contribution ≥ {settings.contribution_min:g}, weight ratio in its column "
            f"≥ {settings.weight_ratio:g}, input ratio ≥ {settings.input_ratio:g}"
            + (f", |activation| ≥ {settings.min_abs:g}" if settings.min_abs > 0 else "")
        )
        text = f"No candidate passed the thresholds ({thresholds}) in {cohort}"
        if len(table):
            top = table.iloc[0]
            text += (
                "; the strongest spikes are listed in candidates.tsv with accepted = False, "
                f"the strongest in layer {top.layer} (output ratio {top.output_ratio:.1f}, input "
                f"ratio {top.input_ratio:.1f}: {top.reason})."
            )
        else:
            text += "."
    return text + f" {n_ln} LayerNorm gain outlier(s) are listed as secondary candidates."


def _top(top_genes: str) -> str:
    return top_genes.split(":")[0] if top_genes else "none"


def probe_scgpt(
    model: ScGPTModel,
    adata: ad.AnnData,
    vocab: dict[str, int],
    settings: ProbeSettings,
    cut: CellCut | None = None,
) -> ScgptProbe:
    """Probe `model` for super weights on a cell-type-stratified sample of `adata`'s cells.

    `adata` is the tokenised AnnData (or its path); `vocab` the checkpoint's vocabulary;
    `cut` how cells become sequences (the checkpoint's, `args.cell_cut`; None: `CellCut()`,
    as for a checkpoint that records none). The model's weights and train/eval modes are
    left as they were.
    """
    adata = read_tokenised(adata)
    cells = _prepare(model, adata, vocab, settings, cut or CellCut())
    first = _cell_spikes(model, cells)
    _check_finite(first, cells, down_projections(model, "scgpt"))

    def run(m) -> None:
        for batch in cells.batches:
            m(batch["gene_ids"], batch["values"], batch["padding_mask"])

    result = find_super_weights(
        model,
        run,
        "scgpt",
        input_ratio=settings.input_ratio,
        output_ratio=settings.output_ratio,
        weight_ratio=settings.weight_ratio,
        token_ratio=settings.token_ratio,
        min_abs=settings.min_abs,
        contribution_min=settings.contribution_min,
        max_rounds=settings.max_rounds,
        residual=settings.residual,
        seed=settings.seed,
    )
    table, spikes = _candidate_table(model, result, cells, settings.n_strongest, first)
    layernorm = _layernorm_table(model, settings.ln_z)
    per_type = cells.obs["cell_type"].value_counts(sort=False)
    per_type = {str(k): int(v) for k, v in per_type.items()}
    accepted = table[table["accepted"]]
    summary = {
        "found": result.found,
        "statement": _statement(table, len(cells.genes), len(per_type), settings, len(layernorm)),
        "n_cells": len(cells.genes),
        "cells_per_type": per_type,
        "splits": list(settings.splits or SPLITS),
        "n_candidates": len(accepted),
        "candidates": accepted[
            ["layer", "row", "col", "token_gene", "n_cells_same_channel"]
        ].to_dict("records"),
        "n_layernorm_outliers": len(layernorm),
        "rounds": result.rounds,
        "stopped": result.stopped,
        "settings": asdict(settings),
    }
    return ScgptProbe(
        result, table, result.layers_frame(), layernorm, _cell_table(spikes, cells), summary
    )


def probe_checkpoint(
    tokenised: ad.AnnData | str | Path,
    checkpoint: str | Path,
    settings: ProbeSettings,
    device: str | torch.device | None = None,
) -> ScgptProbe:
    """Load a checkpoint folder and run `probe_scgpt` on the tokenised data, its cells cut
    as the checkpoint's training cut them."""
    device = torch.device(device) if device else pick_device()
    model, _, vocab = load_checkpoint(checkpoint, device=device)
    return probe_scgpt(model, tokenised, vocab, settings, cell_cut(checkpoint))


def write_outputs(result: ScgptProbe, outputs) -> list[Path]:
    """Write candidates, layers, layernorm, cells (TSV) and summary.json, each atomically.

    `outputs`: a folder or the rule's named outputs (`named_paths`).
    """
    paths = named_paths(outputs, OUTPUT_FILES)
    tables = [write_tsv(paths[name], getattr(result, name)) for name in OUTPUT_TABLES]
    return [*tables, write_json(paths["summary"], result.summary)]


def run(inputs, outputs, settings: ProbeSettings) -> ScgptProbe:
    """The probe stage: probe `inputs["checkpoint"]` on `inputs["data"]`; write the tables
    (`write_outputs`) and the figures (`probe_plots.write_figures`) to `outputs`."""
    from .probe_plots import write_figures

    result = probe_checkpoint(inputs["data"], inputs["checkpoint"], settings)
    write_outputs(result, outputs)
    write_figures(result, outputs)
    return result
