"""A checkpoint folder's args.json and vocab.json, read without torch (the workflow checks a
configured checkpoint as it is parsed)."""

import json
from pathlib import Path

from ..data.vocab import load_vocab
from ..errors import UserError

ARGS_FILE, VOCAB_FILE = "args.json", "vocab.json"


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
