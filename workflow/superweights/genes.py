"""The Alzheimer's disease genes that every stage keeps, ranks and highlights by default,
and the shipped gene sets (GMT files), read without the enrichment's dependencies.

APP and the presenilins PSEN1 and PSEN2 (amyloid; familial AD), MAPT (tau), and APOE and
TREM2 (the strongest late-onset risk genes). They form the `AD_CORE_GENES` set of the
shipped `gene_sets/alzheimers_curated.gmt`, whose README cites the discovery of each.
"""

from importlib.resources import files
from pathlib import Path

from .errors import UserError

GENES_OF_INTEREST = ("APP", "MAPT", "TREM2", "APOE", "PSEN1", "PSEN2")
GENE_SETS_DIR = files(__package__) / "gene_sets"
"""The shipped gene-set libraries: curated AD sets and the Bellenguez et al. 2022 GWAS genes."""


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Sets of a GMT file (name, description, genes; tab-separated); `#` lines are skipped.

    A line without a name, description and at least one gene, a repeated set name and a
    file without sets are UserErrors naming the file and line. (`gseapy.read_gmt` would skip
    the malformed line, let the repeated name replace the earlier set and keep repeated genes
    without a word, so the sets tested could differ from the file's.)
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene-set file {path} does not exist")
    sets: dict[str, list[str]] = {}
    first_seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"gene-set file {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        name = fields[0].strip()
        genes = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
        if len(fields) < 3 or not name or not genes:
            raise UserError(
                f"{path}:{number}: a GMT line needs a set name, a description and at least one "
                "gene, separated by tabs"
            )
        if name in sets:
            raise UserError(
                f"{path}:{number}: gene set {name!r} appears again "
                f"(first on line {first_seen[name]})"
            )
        sets[name], first_seen[name] = genes, number
    if not sets:
        raise UserError(f"gene-set file {path} holds no gene sets")
    return sets
