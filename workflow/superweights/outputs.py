"""Atomic writing of output files: text, JSON, TSV tables, figures and h5ad files.

Every writer creates the parent folder, writes under a temporary name beside the target
(same folder, so the final rename is atomic) and renames it into place only when the write
is complete; on failure the temporary file is removed and an existing target is left as it
was. An interrupted rule therefore never leaves a truncated file that looks finished.

Writers take a stage's outputs by name (`named_paths`): a folder, where each file gets its
usual name, or a Snakemake rule's named `output`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    from matplotlib.figure import Figure


def named_paths(where, files: Mapping[str, str]) -> dict[str, Path]:
    """The path of each of a stage's files, by name.

    `files` maps each name to its file name in a stage folder. `where` is that folder, or a
    mapping with these names such as a rule's named `snakemake.output` (or `input`); its
    other entries are left to other readers and writers.
    """
    if isinstance(where, str | os.PathLike):
        return {name: Path(where) / filename for name, filename in files.items()}
    named = dict(where.items())
    missing = [name for name in files if name not in named]
    if missing:
        raise ValueError(f"no path named {missing}; expected the names {list(files)}")
    return {name: Path(named[name]) for name in files}


@contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` with the same suffix, to be written by the caller.

    On success the temporary file is renamed to `out`; on failure it is removed. The parent
    folder of `out` is created. The name is `.<stem>.partial<suffix>`, so writers that pick
    the format from the suffix (matplotlib, anndata) still do.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def to_jsonable(obj):
    """`obj` made of plain JSON values: NaN and ±inf become None, numpy scalars and arrays
    become Python numbers and lists, tuples become lists and mapping keys become strings.
    Other values are returned unchanged."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    return obj


def write_json(path: str | Path, obj, indent: int = 2) -> Path:
    """Write `to_jsonable(obj)` as indented JSON with a final newline, atomically.

    Non-ASCII text is written as is (UTF-8); values JSON cannot hold (such as paths) are
    written as their `str`.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, default=str)
    return write_text(path, text + "\n")


def write_tsv(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write `frame` as a tab-separated table with a header and no index, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def save_figure(
    fig: Figure, path: str | Path, dpi: int = 120, bbox_inches: str | None = None
) -> Path:
    """Save `fig` to `path` atomically (format from the suffix) and close it; returns the path.

    `bbox_inches="tight"` trims the margins. The figure is closed even when saving fails;
    figures made with `Figure()` rather than pyplot need no closing and are left alone.
    """
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches)
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:  # without pyplot loaded, no figure can be registered with it
            pyplot.close(fig)
    return Path(path)


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    """Write `adata` to the h5ad file `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
