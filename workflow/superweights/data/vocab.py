"""Gene vocabularies: a checkpoint's vocab.json, or one built from the data's genes.

`scgpt_human_genes.txt` lists the 60,694 genes of scGPT's whole-human vocabulary in id
order: the released whole-human model's vocab.json (the same as scgpt 0.2.4's
`default_census_vocab.json`) without its special tokens. The demo data draws its genes
from it, so a released model knows every demo gene.
"""

import json
import logging
import re
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
REQUIRED_TOKENS = ("<pad>", "<cls>")
ENSEMBL_ID = re.compile(r"ENS[A-Z]*G\d{6,}(\.\d+)?")


def scgpt_human_genes() -> list[str]:
    """The genes of scGPT's whole-human vocabulary, in id order."""
    return (files(__package__) / "scgpt_human_genes.txt").read_text().split()


def genes_vocab(genes: Iterable[str]) -> dict[str, int]:
    """`{gene: position}` for `genes`, then `<pad>`, `<cls>`, `<eoc>` (scGPT's layout)."""
    names = [*map(str, genes), *SPECIAL_TOKENS]
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        repeated = pd.Index(names)[pd.Index(names).duplicated()].unique()
        raise UserError(f"gene names repeat or clash with special tokens: {list(repeated[:3])}")
    return vocab


def load_vocab(path: str | Path | None = None) -> dict[str, int]:
    """A checkpoint's vocab.json (its folder or the file); without a path, scGPT's human one.

    The file must be a flat `{token: id}` object with ids 0..n-1 and `<pad>` and `<cls>`.
    """
    if path is None:
        return genes_vocab(scgpt_human_genes())
    path = Path(path)
    if path.is_dir():
        path = path / "vocab.json"
    if not path.is_file():
        raise UserError(f"vocabulary file not found: {path}")
    try:
        vocab = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"vocabulary {path} is not valid JSON: {err}") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()
    ):
        raise UserError(f"vocabulary {path} must be a flat JSON object of gene -> integer id")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"vocabulary {path} must number its tokens 0..{len(vocab) - 1}, once each")
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"vocabulary {path} lacks the special token(s) {', '.join(missing)}")
    return vocab


def ensembl_ids(names: pd.Index) -> pd.Index:
    """The `names` that are Ensembl gene IDs (ENSG00000142192, ENSMUSG..., with a version)."""
    return names[np.asarray(names.str.fullmatch(ENSEMBL_ID), bool)]


def mostly_ensembl(names: pd.Index) -> bool:
    """Whether at least half of `names` are Ensembl gene IDs."""
    return len(names) > 0 and len(ensembl_ids(names)) >= 0.5 * len(names)


def naming_hint(names: pd.Index) -> str:
    """What to do about gene names that a symbol vocabulary does not know."""
    if mostly_ensembl(names):
        return (
            f"the data's gene names are Ensembl IDs (e.g. {ensembl_ids(names)[0]}) but the "
            "vocabulary holds gene symbols: map the IDs to HGNC symbols or put symbols in "
            "var['feature_name']"
        )
    return (
        "the vocabulary holds HGNC gene symbols (e.g. APP, MAPT); the data's names start "
        f"{', '.join(names[:3])}: put symbols in var's index or var['feature_name']"
    )


def vocab_overlap(
    names: pd.Index, vocab: dict[str, int], min_fraction: float, source
) -> np.ndarray:
    """Which `names` the vocabulary knows; UserError when fewer than `min_fraction` (or none) do."""
    known = np.asarray(names.isin(list(vocab)))
    n, fraction = int(known.sum()), float(known.mean()) if len(names) else 0.0
    log.info("%d of %d genes (%.1f%%) are in %s", n, len(names), 100 * fraction, source)
    if n == 0 or fraction < min_fraction:
        raise UserError(
            f"only {n:,} of {len(names):,} genes ({fraction:.1%}) are in {source} "
            f"(preprocess.min_vocab_match is {min_fraction:.0%}); {naming_hint(names)}"
        )
    return known
