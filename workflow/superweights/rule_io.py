"""Glue for the workflow's rule scripts: logging to the rule's log, one-line user errors."""

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .outputs import all_or_nothing, check_writable

USER_ERROR_EXIT = 2
"""Exit status of a `UserError`, from a rule script as from the `superweights` command."""

log = logging.getLogger(__name__)


def setup_logging(stream=None) -> None:
    """Log INFO and above as 'time level message' lines."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=stream or sys.stderr,
        force=True,
    )


def describe_path(path: str | Path) -> str:
    """`path (size)`: bytes in human units, a folder's file count, or 'missing'."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return f"{path}/ ({len(files)} files, {_size(sum(p.stat().st_size for p in files))})"
    if path.is_file():
        return f"{path} ({_size(path.stat().st_size)})"
    return f"{path} (missing)"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


@contextmanager
def rule_log(snakemake):
    """Send stderr and logging to the rule's log; a UserError becomes one line and exit 2.

    The log starts with the files the rule reads and ends with those it wrote and the time
    taken; the stage logs what it does in between. The outputs' folders must be writable
    before the work starts, and the files the rule writes are kept only if it succeeds
    (`outputs.all_or_nothing`).
    """
    outputs = [str(out) for out in getattr(snakemake, "output", [])]
    with open(snakemake.log[0], "w", buffering=1) as log_file:
        sys.stderr = log_file
        setup_logging(log_file)
        start = time.perf_counter()
        try:
            if hasattr(snakemake, "rule"):
                log.info("rule %s", snakemake.rule)
            for path in getattr(snakemake, "input", []):
                log.info("read %s", describe_path(path))
            check_writable(Path(out).parent for out in outputs)
            with all_or_nothing():
                yield
            for path in outputs:
                log.info("wrote %s", describe_path(path))
            log.info("done in %.1f s", time.perf_counter() - start)
        except UserError as err:
            print(f"error: {err}", file=log_file)
            sys.exit(USER_ERROR_EXIT)
        finally:
            sys.stderr = sys.__stderr__
