"""Super activations over training: the probe's statistics on fixed validation cells.

While `pretrain` or `finetune` runs, a `SpikeMonitor` runs `find_super_weights` on one fixed
batch of validation cells (seeded `sample_rows` of the val split, tokenised by
`cell_batches` as every later stage sees them) before the first step, every `every` steps
and after every epoch. Each pass writes one row per layer (`record` "layer"): the probe's
round-1 statistics (largest |input| and |output| of the down-projection and their ratios to
the layer median, channels, the kind of token they sit on, the post-LN residual ratio, and
the weight the output spike traces to), and one row per tracked weight (`record` "weight")
with its current value. Tracked weights are the starting model's super weights (its full
probe, every round) and the weight each layer's strongest spike traced to then
("candidate"), plus any weight a later pass accepts ("emerged"). A recorded epoch equals a
standalone round-1 probe of that epoch's weights on the same batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import anndata as ad
import pandas as pd
import torch
from torch import Tensor

from ..outputs import write_tsv
from ..probe import LayerStat, find_super_weights
from .cells import cell_batches, sample_rows

SPIKES_FILE = "spikes_over_training.tsv"
CLS = "<cls>"


@dataclass
class SpikeRow:
    """One layer's statistics (`record` "layer") or one tracked weight's value ("weight")."""

    phase: str
    step: int
    epoch: float
    record: str
    layer: int
    module: str
    row: int
    col: int
    weight: float
    source: str = ""
    ratio_in: float = math.nan
    ratio_out: float = math.nan
    max_in: float = math.nan
    max_out: float = math.nan
    median_in: float = math.nan
    median_out: float = math.nan
    channel_in: int = -1
    channel_out: int = -1
    token_in: str = ""
    token_out: str = ""
    resid_ratio: float = math.nan
    resid_channel: int = -1
    decision: str = ""
    reason: str = ""
    seconds: float = math.nan


COLUMNS = [f.name for f in fields(SpikeRow)]


def fixed_cells(
    adata: ad.AnnData,
    vocab: dict[str, int],
    pad_token_id: int,
    n_cells: int,
    max_seq_len: int,
    seed: int,
    device,
) -> list[dict[str, Tensor]]:
    """One batch of up to `n_cells` validation cells (seeded), tokenised as training does."""
    rows = sample_rows(adata.obs["split"].astype(str).to_numpy(), ("val",), n_cells, seed)
    return cell_batches(
        adata, vocab, rows, pad_token_id=pad_token_id, batch_size=len(rows),
        max_seq_len=max_seq_len, seed=seed, labelled=False, device=device,
    )  # fmt: skip


def run_cells(batches: list[dict[str, Tensor]]):
    """The forward pass over `batches` that `find_super_weights` calls (encoder outputs only)."""

    def run(model) -> None:
        for b in batches:
            model(b["gene_ids"], b["values"], b["padding_mask"], heads=())

    return run


class SpikeMonitor:
    """Records the probe's statistics on fixed cells during one training phase.

    `every`: steps between passes inside an epoch (0 = only before training and after each
    epoch). `seconds` sums the time the passes took, for the caller's cost accounting.
    """

    def __init__(self, batches: list[dict[str, Tensor]], vocab: dict[str, int], phase: str,
                 every: int = 0):  # fmt: skip
        self.run = run_cells(batches)
        names = {i: g for g, i in vocab.items()}
        self.tokens = [
            [names[int(t)] for t in ids[~pad].tolist()]
            for b in batches
            for ids, pad in zip(b["gene_ids"].cpu(), b["padding_mask"].cpu(), strict=True)
        ]
        self.phase, self.every = phase, every
        self.rows: list[dict] = []
        self.tracked: list[dict] = []
        self.seconds = 0.0

    def due(self, step: int) -> bool:
        """Whether a pass is due after global step `step` (besides epoch ends)."""
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def record(self, model, step: int, epoch: float) -> None:
        """One statistics pass on `model` (in float32, eval mode; its modes are restored)."""
        start = time.perf_counter()
        first = not self.rows
        result = find_super_weights(model, self.run, "scgpt", max_rounds=10 if first else 1)
        stats = [s for s in result.layer_stats if s.round == 1]
        if first:
            for c in result.candidates:
                self._track(c.module, c.layer, c.row, c.col, "super weight")
            for s in stats:
                self._track(s.module, s.layer, s.row, s.col, "candidate")
        for s in stats:
            if s.decision == "accepted":
                self._track(s.module, s.layer, s.row, s.col, f"emerged at step {step}")
        common = {"phase": self.phase, "step": step, "epoch": epoch}
        rows = [asdict(self._layer_row(s, common)) for s in stats]
        modules = dict(model.named_modules())
        for w in self.tracked:
            value = float(modules[w["module"]].weight[w["row"], w["col"]])
            rows.append(asdict(SpikeRow(**common, record="weight", weight=value, **w)))
        seconds = time.perf_counter() - start
        for row in rows:
            row["seconds"] = round(seconds, 4)
        self.rows += rows
        self.seconds += seconds

    def _track(self, module: str, layer: int, row: int, col: int, source: str) -> None:
        if row < 0 or any((w["module"], w["row"], w["col"]) == (module, row, col)
                          for w in self.tracked):  # fmt: skip
            return
        self.tracked.append(
            {"module": module, "layer": layer, "row": row, "col": col, "source": source}
        )

    def _token(self, item: int, token: int) -> str:
        return self.tokens[item][token]

    def _layer_row(self, s: LayerStat, common: dict) -> SpikeRow:
        return SpikeRow(
            **common, record="layer", layer=s.layer, module=s.module, row=s.row, col=s.col,
            weight=s.weight, ratio_in=s.ratio_in, ratio_out=s.ratio_out, max_in=s.max_in,
            max_out=s.max_out, median_in=s.median_in, median_out=s.median_out,
            channel_in=s.channel_in, channel_out=s.channel_out,
            token_in=self._token(s.item_in, s.token_in),
            token_out=self._token(s.item_out, s.token_out),
            resid_ratio=math.nan if s.resid_ratio is None else s.resid_ratio,
            resid_channel=-1 if s.resid_channel is None else s.resid_channel,
            decision=s.decision,
            reason=s.reason,
        )  # fmt: skip

    def state_dict(self) -> dict:
        """What a resumed run needs: the rows so far and the tracked weights."""
        return {"rows": list(self.rows), "tracked": list(self.tracked), "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.tracked = list(state["rows"]), list(state["tracked"])
        self.seconds = state["seconds"]


def write_spikes(rows: list[dict], path) -> None:
    """Write recorded rows as spikes_over_training.tsv (the header alone when none)."""
    write_tsv(path, pd.DataFrame(rows, columns=COLUMNS))


def read_spikes(path) -> pd.DataFrame:
    """A spikes_over_training.tsv with its columns typed."""
    frame = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["", "nan", "NaN"])
    missing = [c for c in ("phase", "step", "record", "layer", "weight") if c not in frame]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; is it a spikes_over_training.tsv?")
    return frame
