"""The scGPT gene vocabulary: from a checkpoint's vocab.json or the installed scgpt package."""

import importlib.util
import json
from pathlib import Path

from ..errors import UserError

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


def default_vocab_path() -> Path:
    """Path of `default_census_vocab.json` inside the installed scgpt package (not imported)."""
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the scGPT vocabulary needs the scgpt package: run "
            "'pip install --no-deps scgpt==0.2.4' or give a checkpoint folder with vocab.json"
        )
    path = (
        Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "default_census_vocab.json"
    )
    if not path.is_file():
        raise UserError(f"scgpt is installed but {path} is missing; reinstall scgpt==0.2.4")
    return path


def load_vocab(path: str | Path | None = None) -> dict[str, int]:
    """Read a flat {gene symbol: id} vocabulary; the default is scGPT's census vocabulary."""
    path = Path(path) if path else default_vocab_path()
    if path.is_dir():
        path = path / "vocab.json"
    if not path.is_file():
        raise UserError(f"vocabulary file not found: {path}")
    try:
        vocab = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"vocabulary {path} is not valid JSON: {err}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise UserError(f"vocabulary {path} must be a flat JSON object of gene -> integer id")
    # The packaged census vocabulary has genes only; released checkpoints append
    # <pad>, <cls>, <eoc> after the last gene id. Do the same where they are missing.
    next_id = max(vocab.values()) + 1
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return vocab
