"""Atomic writing of output files: text, JSON, TSV tables, figures and h5ad files.

Every writer creates the parent folder, writes under a temporary name beside the target
(same folder, so the final rename is atomic) and renames it into place only when the write
is complete; on failure the temporary file is removed and an existing target is left as it
was. An interrupted rule therefore never leaves a truncated file that looks finished. Files
and folders get the mode the umask gives (`umask_mode`), whatever mode the writer or
`tempfile` created them with, so a shared results folder stays readable by the group. A
write the system refuses (disk full, read-only or unwritable folder) is a one-line
`UserError`. Inside `all_or_nothing()` a failure undoes every file the block wrote, so a
stage that fails half-way leaves its earlier outputs as they were.

Writers take a stage's outputs by name (`named_paths`): a folder, where each file gets its
usual name, or a Snakemake rule's named `output`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

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


_written: dict[Path, Path | None] | None = None  # in a block: target -> backup of its old file


@contextmanager
def atomic_path(out: str | Path, *, rollback: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `out` with the same suffix, to be written by the caller.

    On success the temporary file is renamed to `out`; on failure it is removed. The parent
    folder of `out` is created. The name is `.<stem>.partial<suffix>`, so writers that pick
    the format from the suffix (matplotlib, anndata) still do. An OSError while writing
    becomes a UserError. With `rollback` False, a failing `all_or_nothing` block leaves the
    file as written (a training state that the next run resumes from).
    """
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        with refused_writes(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            yield tmp
            if rollback and _written is not None and out not in _written:
                _written[out] = _backup(out) if out.exists() else None
            apply_umask(tmp)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(folder: bool = False) -> int:
    """The mode `open` (0o666) or `mkdir` (0o777) gives under the current umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def apply_umask(path: str | Path) -> None:
    """Give `path` (a file or folder, not recursed) the mode a plain open or mkdir would.

    `tempfile.mkdtemp` creates folders drwx------ and some writers (safetensors) create
    files -rw-------, whatever the umask.
    """
    path = Path(path)
    os.chmod(path, umask_mode(folder=path.is_dir()))


def make_temp_dir(prefix: str, parent: str | Path) -> Path:
    """A new uniquely named folder in `parent` with the umask's mode (not mkdtemp's 0o700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    apply_umask(folder)
    return folder


def _backup(out: Path) -> Path:
    backup = out.with_name(f".{out.stem}.previous{out.suffix}")
    backup.unlink(missing_ok=True)
    try:
        os.link(out, backup)
    except OSError:
        shutil.copy2(out, backup)
    return backup


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Files written atomically inside the block are kept only if the whole block succeeds.

    When it fails, each file it wrote is removed, or put back as it was before the block;
    so a stage stopped half-way (a full disk, say) leaves its earlier outputs as they were.
    Nested blocks join the outer one.
    """
    global _written
    if _written is not None:
        yield
        return
    _written = {}
    ok = False
    try:
        yield
        ok = True
    finally:
        written, _written = _written, None
        for out, backup in reversed(written.items()):
            if ok and backup is not None:
                backup.unlink(missing_ok=True)
            elif not ok and backup is not None:
                os.replace(backup, out)
            elif not ok:
                out.unlink(missing_ok=True)


@contextmanager
def refused_writes(what) -> Iterator[None]:
    """Turn an OSError (disk full, no permission, read-only file system) into a UserError."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot write {what}: {reason}; free disk space or make the folder writable, "
            "then run again (earlier outputs are unchanged)"
        ) from err


def check_writable(folders: Iterable[str | Path]) -> None:
    """Create each folder and a file in it, now, so an unwritable results folder stops a
    stage before any work (UserError)."""
    for folder in dict.fromkeys(Path(f) for f in folders):
        with refused_writes(folder):
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()


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

    `bbox_inches="tight"` trims the margins. Text is drawn as written, never as mathtext: a
    name from the data such as `a$\\frac$` would otherwise stop the drawing. The figure is
    closed even when saving fails; figures made with `Figure()` rather than pyplot need no
    closing and are left alone.
    """
    for text in fig.findobj(lambda artist: hasattr(artist, "set_parse_math")):
        text.set_parse_math(False)
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


def cell_key(kind: str, candidate: str) -> str:
    """The obs/obsm key of a candidate's per-cell values in cells.h5ad, a valid identifier:
    `cell_key("effect", "L1[5,7]")` is ``effect_L1_5_7``."""
    safe = re.sub(r"\W+", "_", candidate).strip("_")
    return f"{kind}_{safe}"
