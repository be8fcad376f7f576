"""A checkpoint folder's args.json and vocab.json, read without torch, and its cells' cut.

Training records in args.json how it cut cells into sequences: `max_seq_len` (tokens per
cell, `<cls>` included; scGPT's own key) and `subsample_seed` (which genes a cell with more
expressed genes keeps). Every stage that runs the model cuts its cells the same way
(`cell_cut`), so a cell carries the genes it carried in training. A checkpoint without them
(a released scGPT model lacking `max_seq_len`, or one saved before they were recorded) is
cut as `CellCut()` says: 1,200 tokens, scGPT's pretraining length, and seed 0.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.vocab import load_vocab
from ..errors import UserError

log = logging.getLogger(__name__)

ARGS_FILE, VOCAB_FILE = "args.json", "vocab.json"


@dataclass(frozen=True)
class CellCut:
    """At most `max_seq_len` tokens per cell (`<cls>` included); a cell with more expressed
    genes keeps a subset drawn with `seed` (`tokens.CellDataset`)."""

    max_seq_len: int = 1200
    seed: int = 0

    def to_args(self) -> dict:
        """The args.json keys that record this cut."""
        return {"max_seq_len": self.max_seq_len, "subsample_seed": self.seed}


def cell_cut(folder: str | Path) -> CellCut:
    """The cut recorded in a checkpoint's args.json; `CellCut()`'s values where it lacks one."""
    args = read_args(Path(folder))
    default = CellCut()
    cut = CellCut(
        int(args.get("max_seq_len", default.max_seq_len)),
        int(args.get("subsample_seed", default.seed)),
    )
    lacking = [key for key in cut.to_args() if key not in args]
    log.info(
        "cells cut to %d tokens, genes drawn with seed %d (%s)",
        cut.max_seq_len,
        cut.seed,
        f"{', '.join(lacking)} not in {folder}/{ARGS_FILE}: defaults" if lacking else "as trained",
    )
    return cut


def read_args_and_vocab(folder: Path) -> tuple[dict, dict[str, int]]:
    """args.json and vocab.json of a checkpoint folder, checked."""
    args = read_args(folder)
    vocab = load_vocab(folder / VOCAB_FILE)
    pad_token = args.get("pad_token", "<pad>")
    if pad_token not in vocab:
        raise UserError(f"{folder / VOCAB_FILE} lacks the pad token {pad_token!r} of args.json")
    return args, vocab


def read_args(folder: Path) -> dict:
    """args.json of a checkpoint folder that has both args.json and vocab.json."""
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    for name in (ARGS_FILE, VOCAB_FILE):
        if not (folder / name).is_file():
            raise UserError(f"checkpoint folder {folder} lacks {name}")
    try:
        args = json.loads((folder / ARGS_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{folder / ARGS_FILE} is not valid JSON: {err}") from None
    if not isinstance(args, dict):
        raise UserError(f"{folder / ARGS_FILE} must hold a JSON object")
    return args
