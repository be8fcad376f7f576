"""Find super weights (Yu et al. 2024) in any model with MLP down-projections.

A down-projection computes ``Y = X · Wᵀ`` with ``W`` of shape (D, H). A super weight
``W[j, k]`` shows up as an input spike ``X[t, k]`` and an output spike ``Y[t, j]`` on the
same token ``t``, with ``Y[t, j]`` coming mostly from ``X[t, k] · W[j, k]``. The probe hooks
every down-projection, records each layer's largest |input| and |output| with their
location and compares them with the layer's median magnitude (an absolute cut-off alone
never fires on post-LayerNorm models). Layers passing every test give candidates; those
weights are zeroed, the output channels of spikes that failed (a diffuse spike that no
single weight makes) are masked so that a smaller spike of the same layer can be seen,
and the model is run again until no spike is left. The probe reports *candidates*: only
the confirmation by pruning (`superweights.confirm`) can call one a super weight. The
model's weights and train/eval modes are restored before returning.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from superweights.editing import evaluation, zeroed
from superweights.errors import UserError
from superweights.outputs import to_jsonable, write_json, write_tsv

DOWN_PROJ_PATTERNS = {
    "scgpt": r"^transformer_encoder\.layers\.(\d+)\.linear2$",
    "hf_decoder": r"^(?:model\.)?layers\.(\d+)\.mlp\.down_proj$",
}
"""Built-in down-projection names (scGPT; Llama, Mistral, OLMo, Phi-3, Qwen); group 1 is the
layer index."""

NORM_SIBLING = "norm2"
"""Default post-LN norm, found next to the down-projection (scGPT's ``layers.N.norm2``)."""

_PAD_TRUE_KEYS = ("padding_mask", "src_key_padding_mask", "key_padding_mask")


@dataclass
class Spike:
    """Largest |activation| a hook saw in one round, where it was, and the median |x| > 0.

    ``item`` is the sequence index over all sequences of the round (3-D activations) or the
    forward-call index (2-D activations); ``token`` is the position inside it. ``row`` is
    the whole activation vector of that token; ``paired`` the module's input vector at the
    same token (output spikes of down-projections only).
    """

    value: float
    magnitude: float
    median: float
    item: int
    token: int
    channel: int
    row: Tensor | None = None
    paired: Tensor | None = None

    @property
    def ratio(self) -> float:
        return _ratio(self.magnitude, self.median)


@dataclass
class Candidate:
    """An accepted super weight ``W[row, col]`` of ``module`` and the spikes it explains."""

    module: str
    layer: int
    row: int
    col: int
    weight: float
    input_value: float
    output_value: float
    input_ratio: float
    output_ratio: float
    contribution: float
    weight_ratio: float
    token_ratio: float
    item: int
    token: int
    round: int
    rank: int = 0


@dataclass
class LayerStat:
    """One layer in one round: spikes, medians, ratios and the decision with its reason.

    ``*_in``/``*_out``: the largest |input| and |output| of the layer and where they were.
    ``row``/``col``: the weight that makes most of the output spike, with the input at
    that token and column (``input_at_spike``), its ratio to the layer's input median, its
    |w| over the median |w| of its column (``weight_ratio``) and the spike over the median
    |output| of its token (``token_ratio``). ``collateral_of`` names the accepted weight
    whose input spike lights an ordinary weight up. ``masked_channels``: output channels of
    this layer left out of this round's search (rejected spikes of earlier rounds).
    """

    round: int
    layer: int
    module: str
    max_in: float
    median_in: float
    ratio_in: float
    item_in: int
    token_in: int
    channel_in: int
    max_out: float
    median_out: float
    ratio_out: float
    item_out: int
    token_out: int
    channel_out: int
    contribution: float
    decision: str
    reason: str
    row: int = -1
    col: int = -1
    weight: float = math.nan
    input_at_spike: float = math.nan
    ratio_in_at_spike: float = math.nan
    weight_ratio: float = math.nan
    token_ratio: float = math.nan
    collateral_of: str = ""
    resid_max: float | None = None
    resid_median: float | None = None
    resid_ratio: float | None = None
    resid_channel: int | None = None
    masked_channels: str = ""


@dataclass
class ProbeResult:
    """Accepted candidates, per-round per-layer statistics, and why the search stopped."""

    candidates: list[Candidate]
    layer_stats: list[LayerStat]
    rounds: int
    stopped: str
    settings: dict

    @property
    def found(self) -> bool:
        return bool(self.candidates)

    def to_frame(self) -> pd.DataFrame:
        """Candidates as a table (one row per candidate; columns even when empty)."""
        return _frame(self.candidates, Candidate)

    def layers_frame(self) -> pd.DataFrame:
        """Per-round, per-layer statistics as a table."""
        return _frame(self.layer_stats, LayerStat)

    def strongest(self, n: int = 5) -> pd.DataFrame:
        """The ``n`` strongest first-round output spikes, with ratios and the verdict."""
        first = self.layers_frame().query("round == 1")
        cols = ["layer", "module", "ratio_in", "ratio_out", "max_in", "max_out"]
        cols += ["token_in", "token_out", "channel_in", "channel_out", "decision", "reason"]
        return first.sort_values("ratio_out", ascending=False).head(n)[cols]

    def summary(self) -> str:
        """One line saying what was found, or that nothing was and what came closest."""
        if self.found:
            where = ", ".join(f"({c.layer}, {c.row}, {c.col})" for c in self.candidates)
            return (
                f"{len(self.candidates)} candidate(s) (layer, row, col): {where}; only "
                "confirmation by pruning (superweights.confirm) makes one a super weight"
            )
        top = self.strongest(1)
        if top.empty:
            return "no candidate found; no layer was probed"
        s = top.iloc[0]
        return (
            f"no candidate found; strongest spike layer {s.layer}: output ratio "
            f"{s.ratio_out:.1f}, input ratio {s.ratio_in:.1f} ({s.reason})"
        )

    def to_json(self) -> dict:
        """A JSON-serialisable dict (non-finite numbers become null)."""
        return to_jsonable(
            {
                "found": self.found,
                "summary": self.summary(),
                "rounds": self.rounds,
                "stopped": self.stopped,
                "settings": self.settings,
                "candidates": [asdict(c) for c in self.candidates],
                "layers": [asdict(s) for s in self.layer_stats],
            }
        )

    def write(self, out_dir: str | Path) -> None:
        """Write ``candidates.tsv``, ``candidates.json`` and ``layers.tsv`` to ``out_dir``."""
        out = Path(out_dir)
        write_tsv(out / "candidates.tsv", self.to_frame())
        write_tsv(out / "layers.tsv", self.layers_frame())
        write_json(out / "candidates.json", self.to_json())


def down_projections(
    model: nn.Module, pattern: str | None = None
) -> dict[int, tuple[str, nn.Module]]:
    """Map layer index → (name, module) of the down-projections matching ``pattern``.

    ``pattern`` is a key of ``DOWN_PROJ_PATTERNS`` or a regex whose first group is the layer
    index; ``None`` tries the built-in patterns in order and uses the first that matches.
    """
    if pattern is None:
        for regex in DOWN_PROJ_PATTERNS.values():
            if found := _match(model, regex):
                return found
        raise UserError(
            f"no down-projection found by the built-in patterns {list(DOWN_PROJ_PATTERNS.values())}"
            "; pass pattern= a regex over module names whose first group is the layer index"
        )
    regex = DOWN_PROJ_PATTERNS.get(pattern, pattern)
    if found := _match(model, regex):
        return found
    raise UserError(f"no module name matches the down-projection pattern {regex!r}")


def find_super_weights(
    model: nn.Module,
    inputs: Mapping[str, Tensor] | Tensor | Callable[[nn.Module], object],
    pattern: str | None = None,
    *,
    input_ratio: float = 10.0,
    output_ratio: float = 100.0,
    weight_ratio: float = 10.0,
    token_ratio: float = 10.0,
    min_abs: float = 0.0,
    contribution_min: float = 0.5,
    max_rounds: int = 10,
    residual: bool = True,
    norm_pattern: str | None = None,
    median_sample: int = 16384,
    seed: int = 0,
) -> ProbeResult:
    """Find super weights by hooking the down-projections and iterating as Yu et al. do.

    ``inputs``: a batch (dict → ``model(**inputs)``, tensor → ``model(inputs)``) or a callable
    ``run(model)`` doing the forward pass(es). Padding tokens are ignored when the model is
    called with ``padding_mask``/``src_key_padding_mask`` (True = pad) or a 2-D
    ``attention_mask`` (0 = pad). Each layer's largest output ``Y[t, j]`` is traced to the
    weight ``W[j, k]`` whose term ``X[t, k]·W[j, k]`` is largest on that token; it is a
    candidate when the spike reaches ``output_ratio`` × the layer median and
    ``token_ratio`` × its token's median, the term makes at least ``contribution_min`` of
    it, ``|W[j, k]|`` reaches ``weight_ratio`` × the median |w| of column ``k``, the input
    ``X[t, k]`` reaches ``input_ratio`` × the layer's input median, and both magnitudes
    reach ``min_abs`` (see `_judge`). Accepted weights are zeroed and the model rerun, for
    at most ``max_rounds`` rounds; spikes that an accepted weight's input column still
    lights up through ordinary weights are recorded as its collateral. A spike that reaches
    ``output_ratio`` but fails another test (a diffuse spike: no single weight makes most
    of it) has its output channel masked in that layer from the next round on, so that a
    smaller super weight of the same layer is not hidden behind it; the search stops after
    a round that accepts nothing and rejects no new spike. Candidates come out strongest
    first (output ratio), numbered by ``rank``.
    With ``residual``, the input of each post-LN norm (regex ``norm_pattern`` with the layer
    as group 1; default the down-projection's sibling ``norm2``) is recorded too.
    Medians are of the non-zero |x| (exact zeros are ReLU outputs or padding) in about
    ``median_sample`` entries (whole random rows, ``seed``) per forward call, pooled over
    the round's calls (every other call's sample is dropped whenever more than 32 are held).
    The probe runs in eval mode without autograd and without PyTorch's fused attention fast
    path; weights, modes and the fast-path setting are restored exactly on return.
    """
    if max_rounds < 1:
        raise UserError(f"max_rounds must be at least 1, got {max_rounds}")
    down = down_projections(model, pattern)
    norms = _norm_modules(model, down, norm_pattern) if residual else {}
    settings = {
        "pattern": pattern,
        "modules": [name for name, _ in down.values()],
        "input_ratio": input_ratio,
        "output_ratio": output_ratio,
        "weight_ratio": weight_ratio,
        "token_ratio": token_ratio,
        "min_abs": min_abs,
        "contribution_min": contribution_min,
        "max_rounds": max_rounds,
        "norm_modules": [name for name, _ in norms.values()],
        "median_sample": median_sample,
    }
    thresholds = {
        key: settings[key]
        for key in ("input_ratio", "output_ratio", "weight_ratio", "token_ratio", "min_abs")
    } | {"contribution_min": contribution_min}
    candidates: list[Candidate] = []
    stats: list[LayerStat] = []
    stopped, rnd = "max_rounds reached", 0
    sample_rows = _SampleRows(median_sample, seed)
    with ExitStack() as edits, evaluation(model), _Hooks(model, down, norms, sample_rows) as hooks:
        for rnd in range(1, max_rounds + 1):
            hooks.reset()
            _forward(model, inputs)
            found = hooks.spikes()
            rejected = []
            for layer, (name, module) in down.items():
                spike_in, spike_out, resid = found[layer]
                stat = _judge(
                    rnd, layer, name, module.weight, spike_in, spike_out, thresholds, candidates
                )
                if resid is not None:
                    stat.resid_max, stat.resid_median = resid.magnitude, resid.median
                    stat.resid_ratio, stat.resid_channel = resid.ratio, resid.channel
                stat.masked_channels = hooks.masked_channels(layer)
                stats.append(stat)
                if stat.decision == "accepted":
                    candidates.append(_candidate(stat, spike_out))
                elif stat.decision == "rejected" and _is_spike(spike_out, thresholds):
                    rejected.append((layer, spike_out.channel))
            accepted = [(c.module, c.row, c.col) for c in candidates if c.round == rnd]
            if not accepted and not rejected:
                stopped = "no spike left"
                break
            if rnd < max_rounds:
                edits.enter_context(zeroed(model, accepted))
                for layer, channel in rejected:
                    hooks.mask(layer, channel)
    candidates.sort(key=lambda c: -c.output_ratio)
    for rank, c in enumerate(candidates, start=1):
        c.rank = rank
    return ProbeResult(candidates, stats, rnd, stopped, settings)


def layernorm_outliers(model: nn.Module, z: float = 3.5) -> pd.DataFrame:
    """Normalisation gains ``γ_j`` whose |γ_j| is unusually large within their own module.

    Robust z-score ``0.6745 · (|γ_j| − median) / MAD`` over one module's |γ| (Iglewicz &
    Hoaglin); a channel is listed when it reaches ``z`` (infinite when MAD is 0 and |γ_j|
    differs from the median). Any module whose class name contains "Norm" and that has a
    1-D ``weight`` counts (LayerNorm, RMSNorm, ...). Rows are sorted by module, then z.
    """
    rows = []
    for name, module in model.named_modules():
        gain = getattr(module, "weight", None)
        if "norm" not in type(module).__name__.lower() or not isinstance(gain, Tensor):
            continue
        if gain.dim() != 1:
            continue
        gain = gain.detach().float().cpu()
        median = gain.abs().median()
        dev = gain.abs() - median
        mad = dev.abs().median()
        if mad > 0:
            scores = 0.6745 * dev / mad
        else:
            scores = torch.where(dev > 0, math.inf, 0.0)
        for channel in torch.nonzero(scores >= z).flatten().tolist():
            rows.append(
                {
                    "module": name,
                    "channel": channel,
                    "gain": float(gain[channel]),
                    "robust_z": float(scores[channel]),
                    "median_abs_gain": float(median),
                    "mad": float(mad),
                }
            )
    cols = ["module", "channel", "gain", "robust_z", "median_abs_gain", "mad"]
    frame = pd.DataFrame(rows, columns=cols)
    return frame.sort_values(["module", "robust_z"], ascending=[True, False], ignore_index=True)


def _match(model: nn.Module, regex: str) -> dict[int, tuple[str, nn.Module]]:
    compiled = re.compile(regex)
    found = {}
    for name, module in model.named_modules():
        if m := compiled.search(name):
            found[int(m.group(1))] = (name, module)
    return dict(sorted(found.items()))


def _norm_modules(model, down, norm_pattern):
    if norm_pattern is not None:
        return {layer: item for layer, item in _match(model, norm_pattern).items() if layer in down}
    modules = dict(model.named_modules())
    found = {}
    for layer, (name, _) in down.items():
        sibling = f"{name.rpartition('.')[0]}.{NORM_SIBLING}"
        if sibling in modules:
            found[layer] = (sibling, modules[sibling])
    return found


class _SampleRows:
    """Fixed random rows (tokens) at which activations of one shape are read for the median.

    Whole rows are read (coalesced memory access): ``size // width`` of them, at least
    ``MIN_ROWS``, or every row when there are no more; one random row in each of that
    many equal strata, drawn on the activations' device without a host round trip (packed
    batches bring a new shape per call). Their padding flags are computed once per
    forward call and shared by all hooks.
    """

    MIN_ROWS = 8

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.strata: dict[tuple[int, torch.device], Tensor] = {}  # i + U(0, 1), i < k
        self.picks: dict[tuple[int, int, torch.device], Tensor] = {}
        self.pad: Tensor | None = None
        self.picked_pad: dict[tuple[int, int, torch.device], Tensor] = {}

    def __call__(self, rows: Tensor, pad_rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        n, width = rows.shape
        key = (n, width, rows.device)
        if key not in self.picks:
            k = max(self.size // width, self.MIN_ROWS)
            self.picks[key] = (
                torch.arange(n, device=rows.device) if n <= k else self._stratified(n, k, rows)
            )
        if pad_rows is None:
            return self.picks[key], None
        if pad_rows is not self.pad:
            self.pad, self.picked_pad = pad_rows, {}
        if key not in self.picked_pad:
            self.picked_pad[key] = pad_rows.index_select(0, self.picks[key])
        return self.picks[key], self.picked_pad[key]

    def _stratified(self, n: int, k: int, rows: Tensor) -> Tensor:
        if (k, rows.device) not in self.strata:
            offsets = torch.rand(k, generator=self.generator, dtype=torch.float64)
            self.strata[k, rows.device] = (torch.arange(k) + offsets).to(rows.device)
        return (self.strata[k, rows.device] * (n / k)).long().clamp_(max=n - 1)


class _Tracker:
    """What one hook saw in one round: the row holding the largest |x|, and samples of |x|.

    Per forward call only a per-row abs-max and small gathers run, with no copy of the
    activations; memory stays bounded however many calls there are (only the best row is
    kept every ``2 * KEEP`` calls; samples of every other call are dropped when more than
    ``KEEP`` are held). ``spike()`` does the rest once per round.
    """

    KEEP = 32

    def __init__(self, sample_rows: _SampleRows):
        self.sample_rows = sample_rows
        self.masked: list[int] = []  # channels left out (kept across rounds)
        self._masked_on: dict[torch.device, Tensor] = {}
        self.reset()

    def mask(self, channel: int) -> None:
        """Leave `channel` out of the peaks, rows and samples from the next call on."""
        self.masked.append(channel)
        self._masked_on = {}

    def reset(self) -> None:
        self.peaks: list[Tensor] = []  # largest |x| of each call
        self.calls: list[int] = []  # index of that call
        self.rows: list[Tensor] = []  # row of that |x|
        self.tops: list[Tensor] = []  # that row
        self.pairs: list[Tensor] = []  # the paired tensor's row at the same place
        self.samples: list[tuple[Tensor, Tensor | None]] = []  # x on fixed rows, padding
        self.layout: list[tuple[tuple[int, ...], int, object]] = []  # shape, first item,
        # and packing (cells laid end to end, see `model.scgpt.Packing`) per call
        self.items = 0
        self.stride = 1

    def update(
        self, t: Tensor, pad_rows: Tensor | None, paired: Tensor | None = None, packing=None
    ) -> None:
        """Record ``t`` ([..., H]); ``pad_rows`` flags padding rows of ``t.view(-1, H)``.

        ``paired`` ([..., H'], same leading shape) is read at the row of ``t``'s peak.
        ``packing`` (with ``index``, ``width``, ``n_cells``) says where the rows of a 2-D
        ``t`` of packed sequences sit in the padded batch, so that spikes are located as
        in it.
        """
        t = _dense(t)
        call, offset = len(self.layout), self.items
        if packing is not None and (t.dim() != 2 or t.shape[0] != len(packing.index)):
            packing = None
        if t.dim() >= 3 or packing is not None:
            self.items += t.shape[0] if packing is None else packing.n_cells
        if t.numel() == 0:
            return
        self.layout.append((tuple(t.shape), offset, packing))
        rows = t.reshape(-1, t.shape[-1])
        if self.masked:  # a copy, only in layers where a rejected spike was masked
            if rows.device not in self._masked_on:
                self._masked_on[rows.device] = torch.tensor(self.masked, device=rows.device)
            rows = rows.index_fill(1, self._masked_on[rows.device], 0)
        if pad_rows is not None and pad_rows.shape[0] != rows.shape[0]:
            pad_rows = None
        peak = _row_peaks(rows)
        if pad_rows is not None:
            peak.masked_fill_(pad_rows, 0)
        magnitude, row = peak.max(0, keepdim=True)
        self.peaks.append(magnitude)
        self.calls.append(call)
        self.rows.append(row)
        self.tops.append(rows.index_select(0, row))
        if paired is not None:
            paired = _dense(paired)
            self.pairs.append(paired.reshape(-1, paired.shape[-1]).index_select(0, row))
        if len(self.peaks) >= 2 * self.KEEP:  # keep the best so far (one sync per 64 calls)
            best = int(torch.cat(self.peaks).argmax())
            for kept in (self.peaks, self.calls, self.rows, self.tops, self.pairs):
                kept[:] = kept[best : best + 1]
        if call % self.stride == 0:
            picks, picked_pad = self.sample_rows(rows, pad_rows)
            self.samples.append((rows.index_select(0, picks), picked_pad))
            if len(self.samples) > self.KEEP:
                self.samples = self.samples[::2]
                self.stride *= 2

    def summary(self) -> list[Tensor]:
        """What `spike` needs, computed where the activations are without waiting for them:
        [largest |x|, its entry in the lists, its row, median |x| > 0 (NaN: none)], that
        row's vector and the paired one. Empty when the hook saw nothing."""
        if not self.peaks:
            return []
        peaks = torch.cat(self.peaks).float()
        best = peaks.argmax()
        sample = torch.cat([_unpadded(x, pad) for x, pad in self.samples]).float().abs()
        median = torch.where(sample > 0, sample, math.nan).nanmedian()
        head = [peaks[best], best, torch.cat(self.rows)[best], median]
        rows = [torch.cat(self.tops)[best]] + ([torch.cat(self.pairs)[best]] if self.pairs else [])
        return [torch.stack([x.double() for x in head])] + [r.double() for r in rows]

    def spike(self, summary: list[Tensor]) -> Spike | None:
        """The largest |x| of the round, where it was, and the median of |x| > 0, from
        `summary()` on the CPU."""
        if not summary:
            return None
        magnitude, best, row, median = summary[0].tolist()
        call, row = self.calls[int(best)], int(row)
        top = summary[1].float()
        channel = int(top.abs().argmax())
        shape, offset, packing = self.layout[call]
        if packing is not None:
            item, token = divmod(int(packing.index[row]), packing.width)
            item += offset
        elif len(shape) == 2:
            item, token = call, row
        else:
            per_item = math.prod(shape[1:-1])
            item, token = offset + row // per_item, row % per_item
        median = 0.0 if math.isnan(median) else median
        paired = summary[2].float() if len(summary) > 2 else None
        return Spike(float(top[channel]), magnitude, median, item, token, channel, top, paired)


def _dense(t: Tensor) -> Tensor:
    """``t`` detached (a run(model) callable may turn autograd back on), nested ones padded."""
    if t.requires_grad:
        t = t.detach()
    return t.to_padded_tensor(0.0) if t.is_nested else t


def _unpadded(sample: Tensor, pad: Tensor | None) -> Tensor:
    """A [rows, H] sample, flattened, with padding rows set to 0."""
    return (sample if pad is None else sample.masked_fill(pad[:, None], 0)).view(-1)


def _to_cpu(parts: list[Tensor]) -> list[Tensor]:
    """`parts` (1-D) on the CPU, in one transfer per device."""
    out: list[Tensor] = list(parts)
    by_device: dict[torch.device, list[int]] = {}
    for i, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(i)
    for places in by_device.values():
        sizes = [parts[i].numel() for i in places]
        host = torch.cat([parts[i] for i in places]).cpu().split(sizes)
        for i, part in zip(places, host, strict=True):
            out[i] = part
    return out


def _row_peaks(rows: Tensor) -> Tensor:
    """max |x| of each row: amax/amin is fastest on CPUs, vector_norm(inf) on GPUs."""
    if rows.device.type == "cpu":
        return torch.maximum(rows.amax(-1), rows.amin(-1).neg_())
    return torch.linalg.vector_norm(rows, math.inf, dim=-1)


class _Hooks:
    """Forward hooks on the down-projections (input and output), the norms and the model."""

    def __init__(self, model, down, norms, sample_rows):
        self.pad: Tensor | None = None  # padding flag of each token of the current call
        self.packing = None  # the current call's packing of sequences, if any
        self.trackers = {
            (layer, part): _Tracker(sample_rows) for layer in down for part in ("in", "out")
        }
        self.trackers |= {(layer, "resid"): _Tracker(sample_rows) for layer in norms}
        self.names = {layer: name for layer, (name, _) in down.items()}
        self.signature = inspect.signature(model.forward)
        self.handles = [model.register_forward_pre_hook(self._watch_mask, with_kwargs=True)]
        for layer, (_, module) in down.items():
            self.handles.append(module.register_forward_hook(self._down_hook(layer)))
        for layer, (_, module) in norms.items():
            self.handles.append(module.register_forward_pre_hook(self._norm_hook(layer)))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def reset(self) -> None:
        for tracker in self.trackers.values():
            tracker.reset()

    def mask(self, layer: int, channel: int) -> None:
        """Leave output `channel` of `layer`'s down-projection out of the search."""
        self.trackers[layer, "out"].mask(channel)

    def masked_channels(self, layer: int) -> str:
        return ",".join(str(c) for c in self.trackers[layer, "out"].masked)

    def spikes(self) -> dict[int, tuple[Spike, Spike, Spike | None]]:
        summaries = {key: tracker.summary() for key, tracker in self.trackers.items()}
        host = iter(_to_cpu([part for parts in summaries.values() for part in parts]))
        spikes = {
            key: self.trackers[key].spike([next(host) for _ in parts])
            for key, parts in summaries.items()
        }
        found = {}
        for layer, name in self.names.items():
            spike_in, spike_out = spikes[layer, "in"], spikes[layer, "out"]
            if spike_in is None or spike_out is None:
                raise RuntimeError(
                    f"the forward hook on {name} saw no activations; the forward pass skipped "
                    "it (fused fast path or nested tensors?) or ran on empty input"
                )
            found[layer] = (spike_in, spike_out, spikes.get((layer, "resid")))
        return found

    def _watch_mask(self, module, args, kwargs) -> None:
        try:
            named = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            named = dict(kwargs)
        pad = _padding_mask(named)
        self.pad = None if pad is None else pad.reshape(-1)  # one flag per token row
        packing = named.get("packing")
        self.packing = packing if hasattr(packing, "cu_seqlens") else None

    def _down_hook(self, layer):
        def hook(module, args, output):
            self.trackers[layer, "in"].update(args[0], self.pad, packing=self.packing)
            self.trackers[layer, "out"].update(output, self.pad, args[0], self.packing)

        return hook

    def _norm_hook(self, layer):
        def hook(module, args):
            self.trackers[layer, "resid"].update(args[0], self.pad, packing=self.packing)

        return hook


def _padding_mask(named: dict) -> Tensor | None:
    for key in _PAD_TRUE_KEYS:
        mask = named.get(key)
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask.bool()
    mask = named.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask == 0
    return None


def _forward(model: nn.Module, inputs) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, Tensor):
        model(inputs)
    elif callable(inputs):
        inputs(model)
    else:
        raise TypeError(f"inputs must be a dict, a tensor or a callable, not {type(inputs)}")


def _judge(rnd, layer, name, weight, spike_in, spike_out, th, accepted) -> LayerStat:
    """Test one layer's output spike against every criterion and say why it fails, if it does.

    The spike is ``Y[t, j]``; the weight ``W[j, k]`` is the one whose term ``X[t, k]·W[j, k]``
    is largest at that token. It is accepted when the spike stands out in its layer
    (``output_ratio``) and its token (``token_ratio``), that one term makes most of it
    (``contribution_min``), the weight stands out in its column (``weight_ratio``) and the
    input ``X[t, k]`` stands out in its layer (``input_ratio``: it confirms the source).
    An ordinary weight lit by the input column of an ``accepted`` weight of the same layer
    is its collateral, not a candidate.
    """
    w = weight.detach()
    j, x, y = spike_out.channel, spike_out.paired, spike_out.row
    terms = x * w[j].float().cpu()
    k = int(terms.abs().argmax())
    contribution = float(terms[k]) / spike_out.value if spike_out.value != 0 else math.nan
    column = w[:, k].float().abs().cpu()
    others = torch.cat([column[:j], column[j + 1 :]])
    weight_ratio = _ratio(float(column[j]), float(others.median()) if len(others) else 0.0)
    token_values = y.abs()
    token_values = token_values[token_values > 0]
    token_ratio = _ratio(spike_out.magnitude, float(token_values.median()))
    input_ratio = _ratio(abs(float(x[k])), spike_in.median)
    reasons = []
    if spike_out.ratio < th["output_ratio"]:
        reasons.append(f"output ratio {spike_out.ratio:.1f} < {th['output_ratio']:g}")
    if spike_out.magnitude < th["min_abs"]:
        reasons.append(f"|output| {spike_out.magnitude:.3g} < min_abs {th['min_abs']:g}")
    if token_ratio < th["token_ratio"]:
        reasons.append(f"token ratio {token_ratio:.1f} < {th['token_ratio']:g}")
    if not contribution >= th["contribution_min"]:
        reasons.append(f"contribution {contribution:.2f} < {th['contribution_min']:g}")
    if weight_ratio < th["weight_ratio"]:
        reasons.append(f"weight ratio in column {weight_ratio:.1f} < {th['weight_ratio']:g}")
    if input_ratio < th["input_ratio"]:
        reasons.append(f"input ratio at the spike {input_ratio:.1f} < {th['input_ratio']:g}")
    if abs(float(x[k])) < th["min_abs"]:
        reasons.append(f"|input| {abs(float(x[k])):.3g} < min_abs {th['min_abs']:g}")
    source = next((c for c in accepted if c.layer == layer and c.col == k and c.row != j), None)
    collateral = source is not None and weight_ratio < th["weight_ratio"]
    decision = "collateral" if collateral else "rejected" if reasons else "accepted"
    reason = "; ".join(reasons) or "accepted"
    if collateral:
        reason = (
            f"collateral of ({layer}, {source.row}, {source.col}): an ordinary weight "
            f"(ratio {weight_ratio:.1f} in its column) lit by the same input spike; {reason}"
        )
    return LayerStat(
        round=rnd,
        layer=layer,
        module=name,
        max_in=spike_in.magnitude,
        median_in=spike_in.median,
        ratio_in=spike_in.ratio,
        item_in=spike_in.item,
        token_in=spike_in.token,
        channel_in=spike_in.channel,
        max_out=spike_out.magnitude,
        median_out=spike_out.median,
        ratio_out=spike_out.ratio,
        item_out=spike_out.item,
        token_out=spike_out.token,
        channel_out=spike_out.channel,
        contribution=contribution,
        decision=decision,
        reason=reason,
        row=j,
        col=k,
        weight=float(w[j, k]),
        input_at_spike=float(x[k]),
        ratio_in_at_spike=input_ratio,
        weight_ratio=weight_ratio,
        token_ratio=token_ratio,
        collateral_of=f"({layer}, {source.row}, {source.col})" if collateral else "",
    )


def _is_spike(spike: Spike, th: dict) -> bool:
    """Whether an output spike stands out in its layer (`output_ratio`, `min_abs`)."""
    return spike.ratio >= th["output_ratio"] and spike.magnitude >= th["min_abs"]


def _ratio(value: float, median: float) -> float:
    if median > 0:
        return value / median
    return math.inf if value > 0 else 0.0


def _candidate(stat: LayerStat, spike_out: Spike) -> Candidate:
    return Candidate(
        module=stat.module,
        layer=stat.layer,
        row=stat.row,
        col=stat.col,
        weight=stat.weight,
        input_value=stat.input_at_spike,
        output_value=spike_out.value,
        input_ratio=stat.ratio_in_at_spike,
        output_ratio=spike_out.ratio,
        contribution=stat.contribution,
        weight_ratio=stat.weight_ratio,
        token_ratio=stat.token_ratio,
        item=spike_out.item,
        token=spike_out.token,
        round=stat.round,
    )


def _frame(records: list, cls: type) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in records], columns=[f.name for f in fields(cls)])
