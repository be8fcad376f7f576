"""Glue for the workflow's rule scripts: logging to the rule's log, one-line user errors."""

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .outputs import all_or_nothing, check_writable

USER_ERROR_EXIT = 2
"""Exit status of a `UserError`, from a rule script as from the `superweights` command."""


def setup_logging(stream=None) -> None:
    """Log INFO and above as 'time level message' lines."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=stream or sys.stderr,
        force=True,
    )


@contextmanager
def rule_log(snakemake):
    """Send stderr and logging to the rule's log; a UserError becomes one line and exit 2.

    The outputs' folders must be writable before the work starts, and the files the rule
    writes are kept only if it succeeds (`outputs.all_or_nothing`).
    """
    with open(snakemake.log[0], "w", buffering=1) as log_file:
        sys.stderr = log_file
        setup_logging(log_file)
        try:
            check_writable(Path(out).parent for out in getattr(snakemake, "output", []))
            with all_or_nothing():
                yield
        except UserError as err:
            print(f"error: {err}", file=log_file)
            sys.exit(USER_ERROR_EXIT)
        finally:
            sys.stderr = sys.__stderr__
