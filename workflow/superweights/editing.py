"""Editing single weights of a model and putting them back bit for bit; candidate tables.

Every stage that prunes, scales or holds out weights goes through `edited_weights`, so a
model always ends as it started, even when the code inside the block fails.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .errors import UserError

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
"""The layer index inside a module or parameter name (scGPT, Hugging Face, GPT-2 styles)."""

CANDIDATE_COLUMNS = ("module", "row", "col")


def layer_of(name: str) -> int | None:
    """Index of the layer a module or parameter belongs to, or None outside the layer stack."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class WeightEdit:
    """Set ``module.weight[rows, cols]`` to ``factor`` times its value (0 prunes)."""

    module: str
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    factor: float = 0.0

    @classmethod
    def single(cls, module: str, row: int, col: int, factor: float = 0.0) -> WeightEdit:
        return cls(module, (int(row),), (int(col),), float(factor))


@contextmanager
def edited_weights(model: nn.Module, edits: Iterable[WeightEdit]) -> Iterator[None]:
    """Apply ``edits`` inside the block; afterwards every edited weight is restored exactly."""
    modules = dict(model.named_modules())
    saved: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for e in edits:
                weight = modules[e.module].weight
                rows = torch.as_tensor(e.rows, device=weight.device, dtype=torch.long)
                cols = torch.as_tensor(e.cols, device=weight.device, dtype=torch.long)
                old = weight[rows, cols].clone()
                saved.append((weight, rows, cols, old))
                weight[rows, cols] = old * e.factor
        yield
    finally:
        with torch.no_grad():
            for weight, rows, cols, old in reversed(saved):
                weight[rows, cols] = old


def zeroed(model: nn.Module, weights: Iterable[tuple[str, int, int]]) -> Iterator[None]:
    """`edited_weights` pruning each ``(module, row, col)``."""
    return edited_weights(model, [WeightEdit.single(m, r, c) for m, r, c in weights])


def read_table(source, what: str, required, hint: str) -> pd.DataFrame:
    """`source` (a DataFrame, copied, or a TSV path) after checking it has the `required`
    columns; an unreadable file or a missing column is a `UserError` naming `what`."""
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
    else:
        try:
            frame = pd.read_csv(source, sep="\t")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise UserError(f"cannot read the {what} {source}: {err}") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(f"{what} lacks column(s) {missing}; {hint}")
    return frame


def read_candidates(source) -> pd.DataFrame:
    """A candidates table from a TSV path, a DataFrame or a probe result (``.to_frame()``).

    Needs ``module``, ``row`` and ``col``; ``layer`` is filled from the module name when
    missing; without ``accepted`` every row counts as accepted.
    """
    if hasattr(source, "to_frame") and not isinstance(source, pd.DataFrame):
        source = source.to_frame()
    needs = "it needs module, row, col (the probe's candidates.tsv has them)"
    frame = read_table(source, "candidates table", CANDIDATE_COLUMNS, needs)
    if frame[["row", "col"]].isna().any().any():
        raise UserError("candidates table has empty row or col values")
    frame = frame.astype({"row": int, "col": int, "module": str})
    if "layer" not in frame.columns:
        frame["layer"] = [layer_of(m) for m in frame["module"]]
    if "accepted" not in frame.columns:
        frame["accepted"] = True
    frame["accepted"] = [
        v if isinstance(v, bool | np.bool_) else str(v).strip().lower() == "true"
        for v in frame["accepted"]
    ]
    return frame.astype({"accepted": bool}).reset_index(drop=True)


def check_candidate(model: nn.Module, module: str, row: int, col: int, listed=math.nan) -> float:
    """The value of ``module.weight[row, col]``, after checking it belongs to this model.

    A module the model lacks or that has no 2-D weight, coordinates outside the weight, or
    a listed weight the model does not hold mean the table comes from another checkpoint.
    """
    weight = getattr(dict(model.named_modules()).get(module), "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or layer_of(module) is None:
        raise UserError(
            f"candidate module {module!r} is not a linear layer of this model's layer stack; "
            "were the candidates found in another checkpoint?"
        )
    if not (0 <= row < weight.shape[0] and 0 <= col < weight.shape[1]):
        raise UserError(
            f"candidate {module}[{row}, {col}] is outside its weight of shape "
            f"{tuple(weight.shape)}; were the candidates found in another checkpoint?"
        )
    value = float(weight.detach()[row, col])
    listed = float(listed)
    if math.isfinite(listed) and abs(listed - value) > 1e-3 * max(1.0, abs(value)):
        raise UserError(
            f"candidate {module}[{row}, {col}] is listed as {listed:.6g} but the model holds "
            f"{value:.6g}; the candidates belong to another checkpoint"
        )
    return value


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, no fused attention fast path (it skips hooks); then restore."""
    modes = [(module, module.training) for module in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training
