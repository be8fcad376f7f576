"""Gene-set enrichment of a super weight's gene ranking, offline by default.

The ranking is the channel map's z-score per gene (`channels.py`). Libraries (library name
-> set name -> genes): GO Biological Process 2023 and KEGG 2021 Human read from blitzgsea's
package data, every `*.gmt` file of the packaged `gene_sets`, GMT files named in config,
and Enrichr libraries named in config (downloaded through gseapy, so only when Enrichr can
be reached). Each library is one family of tests with its own Benjamini-Hochberg FDR:
preranked GSEA over the whole ranking (`gseapy.prerank`; "FDR q-val") and
over-representation of the top-ranked genes (`gseapy.enrich`; "Adjusted P-value", BH over
every set of the library that passes the size limits, overlapping or not) against the
model's gene universe, every gene the map ranked. Tables keep gseapy's column names.
A ranking whose scores are largely tied is not tested (the result would depend on how
ties are ordered). Symbols are matched case-insensitively and reported as the ranking
spells them. Weights that pruning did not confirm are enriched only on request, and
everything about them is marked exploratory.
"""

import logging
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import blitzgsea.enrichr
import gseapy
import numpy as np
import pandas as pd
import requests
from scipy.stats import false_discovery_control

from .errors import UserError
from .outputs import write_json, write_tsv

log = logging.getLogger(__name__)

GeneSets = dict[str, dict[str, list[str]]]
"""Gene-set libraries: library name -> set name -> genes."""

RESOURCE_DIR = files(__package__) / "gene_sets"
PACKAGED_LIBRARIES = ("GO_Biological_Process_2023", "KEGG_2021_Human")
AD_LIBRARIES = ("alzheimers_curated", "bellenguez2022_gwas")
AD_PATTERN = re.compile(r"alzheimer|amyloid|\btau\b|tauopath|microglia|tyrobp", re.IGNORECASE)
ENRICHR_HOST = ("maayanlab.cloud", 443)

PRERANK_COLUMNS = ["library", "Term", "size", "ES", "NES", "NOM p-val", "FDR q-val", "Tag %",
                   "Lead_genes"]  # fmt: skip
ORA_COLUMNS = ["library", "Term", "size", "Overlap", "Odds Ratio", "Combined Score", "P-value",
               "Adjusted P-value", "Genes"]  # fmt: skip
"""gseapy's result columns (res2d), with the library and the set's size in the ranking."""
P_FDR = {"prerank": ("NOM p-val", "FDR q-val"), "ora": ("P-value", "Adjusted P-value")}
OUTPUT_FILES = ("prerank.tsv", "ora.tsv", "ad_terms.tsv")
EXPLORATORY = "exploratory (weight not confirmed by pruning)"
SUMMARY_COLUMNS = [
    "candidate", "confirmed", "status", "ranking", "folder", "n_genes", "tied_fraction", "n_sets",
    "n_tests", "n_significant", "n_ad_significant", "top_term", "top_library", "top_NES", "top_FDR",
    "top_ad_term", "top_ad_library", "top_ad_NES", "top_ad_FDR", "reason", "n_tests_total",
]  # fmt: skip


@dataclass
class GeneSetSettings:
    """Which libraries to load.

    `packaged`: blitzgsea library names; `resource_dir`: folder whose `*.gmt` files are
    loaded ("" for none); `gmt_files`: more GMT paths; `enrichr`: Enrichr library names,
    downloaded (needs network) for `organism`.
    """

    packaged: tuple[str, ...] = PACKAGED_LIBRARIES
    resource_dir: str = str(RESOURCE_DIR)
    gmt_files: tuple[str, ...] = ()
    enrichr: tuple[str, ...] = ()
    organism: str = "Human"

    def __post_init__(self):
        self.packaged, self.gmt_files = tuple(self.packaged), tuple(self.gmt_files)
        self.enrichr = tuple(self.enrichr)


@dataclass
class EnrichSettings:
    """Enrichment tests.

    `method`: gseapy prerank's "multilevel" (adaptive, fgsea-style p-values; ~5 s for all
    GO BP sets on 8,000 genes, 2 cores) or "permutation" (gene-set permutations; 1.5-2 min).
    Sets are kept when `min_size` <= genes in the ranking <= `max_size`; `library_min_size`
    lowers the minimum for small curated libraries. `ora_top_n`: top-ranked genes tested
    for over-representation against all ranked genes. `fdr_threshold`: what the summary
    and plots call significant. `max_tied`: largest fraction of genes whose score equals
    another gene's that a ranking may have and still be tested.
    """

    method: str = "multilevel"
    permutation_num: int = 1000
    min_size: int = 15
    max_size: int = 500
    library_min_size: dict[str, int] = field(
        default_factory=lambda: {name: 3 for name in AD_LIBRARIES}
    )
    ora_top_n: int = 100
    fdr_threshold: float = 0.05
    max_tied: float = 0.05
    threads: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("multilevel", "permutation"):
            raise UserError(
                f"enrichment method must be multilevel or permutation, not {self.method!r}"
            )
        sizes = [self.min_size, *self.library_min_size.values()]
        if min(sizes) < 1 or self.max_size < max(sizes):
            raise UserError(
                f"gene-set sizes need 1 <= min_size <= max_size "
                f"(got minimum sizes {sizes}, max_size {self.max_size})"
            )
        if self.permutation_num < 1 or self.ora_top_n < 1 or self.threads < 1:
            raise UserError("permutation_num, ora_top_n and threads must be >= 1")
        if not 0 < self.fdr_threshold <= 1:
            raise UserError(f"fdr_threshold must be in (0, 1], not {self.fdr_threshold}")
        if not 0 <= self.max_tied < 1:
            raise UserError(f"max_tied must be in [0, 1), not {self.max_tied}")

    def min_size_of(self, library: str) -> int:
        return self.library_min_size.get(library, self.min_size)


# --- gene-set libraries -----------------------------------------------------------------


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Sets of a GMT file (name, description, genes; tab-separated); `#` lines are skipped.

    A line without a name, description and at least one gene, a repeated set name and a
    file without sets are UserErrors naming the file and line.
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


def packaged_library(name: str) -> dict[str, list[str]]:
    """A library shipped inside the blitzgsea package, read without network access."""
    folder = Path(blitzgsea.enrichr.get_data_path())
    path = folder / name
    if not path.is_file():
        shipped = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".json")
        raise UserError(
            f"gene-set library {name!r} is not shipped with blitzgsea (it has: "
            f"{', '.join(shipped)}); list it under the Enrichr libraries to download it, "
            "or give a GMT file"
        )
    return read_gmt(path)


def enrichr_library(name: str, organism: str = "Human") -> dict[str, list[str]]:
    """Download an Enrichr library through gseapy; UserError naming it when offline."""
    offline = (
        f"gene-set library {name!r} must be downloaded from Enrichr ({ENRICHR_HOST[0]}), which "
        "cannot be reached; go online, or use a local GMT file instead"
    )
    try:
        socket.create_connection(ENRICHR_HOST, timeout=5).close()
    except OSError:
        raise UserError(offline) from None
    try:
        return gseapy.get_library(name=name, organism=organism)
    except requests.RequestException:
        raise UserError(offline) from None
    except ValueError:
        raise UserError(f"Enrichr has no {organism} library named {name!r}") from None


def load_gene_sets(settings: GeneSetSettings) -> GeneSets:
    """All libraries the settings name, keyed by library name (a GMT file's stem)."""
    libraries: GeneSets = {}

    def add(name: str, sets: dict[str, list[str]], source) -> None:
        if name in libraries:
            raise UserError(f"two gene-set libraries are named {name!r} (again from {source})")
        libraries[name] = sets
        log.info("gene sets: %s, %d sets (%s)", name, len(sets), source)

    for name in settings.packaged:
        add(name, packaged_library(name), "blitzgsea")
    paths = []
    if settings.resource_dir:
        folder = Path(settings.resource_dir)
        if not folder.is_dir():
            raise UserError(f"gene-set folder {folder} does not exist")
        paths += sorted(folder.glob("*.gmt"))
    paths += [Path(p) for p in settings.gmt_files]
    for path in paths:
        add(path.stem, read_gmt(path), path)
    for name in settings.enrichr:
        add(name, enrichr_library(name, settings.organism), "Enrichr")
    return libraries


# --- tests ------------------------------------------------------------------------------


def tied_fraction(scores) -> float:
    """Fraction of the scores that equal another score."""
    values = pd.Series(scores, dtype=float)
    return float(values.duplicated(keep=False).mean()) if len(values) else 0.0


def _clean_ranking(ranking: pd.Series) -> pd.Series:
    scores = pd.to_numeric(ranking, errors="coerce").astype(float)
    scores.index = scores.index.astype(str)
    scores = scores[np.isfinite(scores.to_numpy())]
    if scores.empty:
        raise UserError("the gene ranking has no finite scores")
    if scores.index.has_duplicates:
        repeated = scores.index[scores.index.duplicated()].unique()[:5].tolist()
        raise UserError(f"the gene ranking lists genes more than once: {repeated}")
    frame = scores.rename("score").rename_axis("gene").reset_index()
    frame = frame.sort_values(["score", "gene"], ascending=[False, True])
    return frame.set_index("gene")["score"]


def check_ties(ranking: pd.Series, max_tied: float) -> str:
    """Why the ranking is too tied to be tested ('' if it is not)."""
    tied = tied_fraction(_clean_ranking(ranking))
    if tied <= max_tied:
        return ""
    return (
        f"{tied:.0%} of the ranked genes share their score with another gene (at most "
        f"{max_tied:.0%} allowed): a preranked test would depend on how ties are ordered"
    )


def _matched(sets: Mapping[str, list[str]], universe: Iterable[str], lo: int, hi: int):
    """Sets restricted to `universe` (case-insensitive, in its spelling), lo <= size <= hi."""
    spelling: dict[str, str] = {}
    for gene in universe:
        spelling.setdefault(gene.upper(), gene)
    matched = {}
    for term, genes in sets.items():
        found = list(dict.fromkeys(spelling[g.upper()] for g in genes if g.upper() in spelling))
        if lo <= len(found) <= hi and len(found) < len(spelling):
            matched[term] = found
    return matched


def _by_fdr(frames: list[pd.DataFrame], columns: list[str], analysis: str) -> pd.DataFrame:
    """The libraries' rows together, by FDR, p, then decreasing |effect|."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)[columns]
    p, fdr = P_FDR[analysis]
    effect = "NES" if analysis == "prerank" else "Odds Ratio"
    order = table.assign(_effect=-table[effect].abs())
    order = order.sort_values([fdr, p, "_effect", "library", "Term"])
    return table.loc[order.index].reset_index(drop=True)


@dataclass
class Prerank:
    """Preranked GSEA: one row per tested set (`PRERANK_COLUMNS`), by FDR then |NES|; the
    ranking as tested (highest first); and gseapy's running sums ("hits", "RES") of the
    `keep_curves` best sets and best AD sets of each library with their NES, NOM p-val and
    FDR q-val, keyed (library, Term)."""

    table: pd.DataFrame
    ranking: pd.Series
    curves: dict[tuple[str, str], dict] = field(default_factory=dict)


def prerank(
    ranking: pd.Series, gene_sets: GeneSets, settings: EnrichSettings, keep_curves: int = 5
) -> Prerank:
    """Preranked GSEA (`gseapy.prerank`) of `ranking` (score per gene, high = most
    associated) in each library; FDR q-val is BH within the library."""
    ranking = _clean_ranking(ranking)
    reason = check_ties(ranking, settings.max_tied)
    if reason:
        raise UserError(reason)
    frames, curves = [], {}
    for library, sets in gene_sets.items():
        lo = settings.min_size_of(library)
        matched = _matched(sets, ranking.index, lo, settings.max_size)
        if not matched:
            log.info("prerank: no set of %s has %d-%d ranked genes", library, lo, settings.max_size)
            continue
        result = gseapy.prerank(
            rnk=ranking,
            gene_sets=matched,
            min_size=lo,
            max_size=settings.max_size,
            permutation_num=settings.permutation_num,
            method=settings.method,
            threads=settings.threads,
            seed=settings.seed,
            outdir=None,
            no_plot=True,
            verbose=False,
        )
        res = result.res2d.assign(library=library)
        res["size"] = [len(matched[t]) for t in res["Term"]]
        res = res.astype({"ES": float, "NES": float, "NOM p-val": float, "FDR q-val": float})
        res = _by_fdr([res], PRERANK_COLUMNS, "prerank")
        frames.append(res)
        by_term = res.set_index("Term")
        for term in [*res["Term"].head(keep_curves), *ad_rows(res)["Term"].head(keep_curves)]:
            run, tested = result.results[term], by_term.loc[term, ["NES", "NOM p-val", "FDR q-val"]]
            curve = {"hits": list(map(int, run["hits"])), "RES": run["RES"], **tested.to_dict()}
            curves[(library, term)] = curve
    return Prerank(_by_fdr(frames, PRERANK_COLUMNS, "prerank"), ranking, curves)


def ora(
    genes: Iterable[str], background: Iterable[str], gene_sets: GeneSets, settings: EnrichSettings
) -> pd.DataFrame:
    """Over-representation (`gseapy.enrich`, hypergeometric) of `genes` among `background`.

    Only sets with an overlap are listed, but the Adjusted P-value is BH over every set of
    the library within the size limits (a set without overlap has p = 1).
    """
    background = list(dict.fromkeys(map(str, background)))
    in_background = {g.upper(): g for g in background}
    selected = list(
        dict.fromkeys(in_background[g.upper()] for g in genes if g.upper() in in_background)
    )
    if not selected:
        raise UserError("none of the genes for over-representation is in the background")
    chosen = set(selected)
    frames = []
    for library, sets in gene_sets.items():
        family = _matched(sets, background, settings.min_size_of(library), settings.max_size)
        matched = {t: g for t, g in family.items() if not chosen.isdisjoint(g)}
        if not matched:
            continue
        res = gseapy.enrich(
            gene_list=selected,
            gene_sets=matched,
            background=background,
            outdir=None,
            cutoff=1.0,
            no_plot=True,
            verbose=False,
        ).res2d
        if res is None or res.empty:
            continue
        p = res["P-value"].astype(float).to_numpy()
        padded = np.concatenate([p, np.ones(len(family) - len(p))])
        res = res.assign(
            library=library, **{"Adjusted P-value": false_discovery_control(padded)[: len(p)]}
        )
        res["size"] = [len(matched[t]) for t in res["Term"]]
        frames.append(res)
    return _by_fdr(frames, ORA_COLUMNS, "ora")


def ad_rows(table: pd.DataFrame, libraries: Sequence[str] = AD_LIBRARIES) -> pd.DataFrame:
    """Rows about Alzheimer's disease: curated libraries, or terms naming AD biology."""
    if table.empty:
        return table.copy()
    keep = table["library"].isin(libraries) | table["Term"].str.contains(AD_PATTERN)
    return table.loc[keep].reset_index(drop=True)


def top_genes(ranking: pd.Series, n: int) -> list[str]:
    """The n highest-scoring genes (ties by name)."""
    return _clean_ranking(ranking).index[:n].tolist()


def enrich_ranking(
    ranking: pd.Series, gene_sets: GeneSets, settings: EnrichSettings
) -> tuple[dict[str, pd.DataFrame], Prerank]:
    """Prerank, ORA of the top `ora_top_n` genes against all ranked genes, and their AD
    rows, as {file name: table}, with the prerank result."""
    pre = prerank(ranking, gene_sets, settings)
    over = ora(top_genes(ranking, settings.ora_top_n), ranking.index, gene_sets, settings)
    ad = pd.concat(
        [ad_rows(pre.table).assign(analysis="prerank"), ad_rows(over).assign(analysis="ora")],
        ignore_index=True,
    )
    columns = ["analysis", *PRERANK_COLUMNS, *(c for c in ORA_COLUMNS if c not in PRERANK_COLUMNS)]
    tables = {
        "prerank.tsv": pre.table,
        "ora.tsv": over,
        "ad_terms.tsv": ad.reindex(columns=columns),
    }
    return tables, pre


def ranking_from_genes(genes: pd.DataFrame, candidate: str, stratum_type: str = "all") -> pd.Series:
    """A candidate's gene z-scores from the channel map's gene table (candidate,
    stratum_type, gene, z columns), for its first stratum of `stratum_type`."""
    rows = genes[(genes["candidate"] == candidate) & (genes["stratum_type"] == stratum_type)]
    if rows.empty:
        raise UserError(f"the gene table has no {stratum_type!r} rows for candidate {candidate}")
    rows = rows[rows["stratum"] == rows["stratum"].iloc[0]]
    return rows.set_index("gene")["z"].astype(float)


def ranking_from_association(association: pd.DataFrame, candidate: str) -> pd.Series:
    """A candidate's cell-level gene z-scores (`cell_map`'s association table)."""
    rows = association[association["candidate"] == candidate]
    return rows.set_index("gene")["z"].astype(float)


RANKING_FOLDERS = {"token": "", "cell": "_cell"}
"""Folder suffix of each ranking: token-level (channel map) or cell-level (association)."""


def candidate_dirname(candidate: str) -> str:
    """A file-system-safe folder name for a candidate id such as 'L2[3,5]' -> 'L2_3_5'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", candidate).strip("_")


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each table as TSV into `out_dir`, each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_tsv(out / name, table) for name, table in tables.items()]


def _best(table: pd.DataFrame, prefix: str) -> dict:
    """The first (most significant) row's term, library, NES and FDR."""
    keys = {"term": "Term", "library": "library", "NES": "NES", "FDR": "FDR q-val"}
    top = table.iloc[0] if len(table) else pd.Series(dtype=object)
    return {f"{prefix}_{k}": top.get(c, np.nan) for k, c in keys.items()}


def _curves_json(pre: Prerank) -> dict:
    """The running sums gseapy tested, for `enrich_plots` (gseaplot's inputs)."""
    return {
        "rank_metric": pre.ranking.tolist(),
        "curves": [{"library": lib, "Term": term, **c} for (lib, term), c in pre.curves.items()],
    }


def enrich_candidates(
    genes: pd.DataFrame,
    gene_sets: GeneSets,
    settings: EnrichSettings,
    out_dir: str | Path,
    association: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Enrich every candidate of the channel map's gene table (its "all" stratum) and, with
    `association` (`cell_map`'s table), the same candidates' cell-level z-scores.

    Writes `<out_dir>/<candidate_dirname>[_cell]/{prerank,ora,ad_terms}.tsv` and
    `gsea_curves.json` (what `enrich_plots` draws), and `<out_dir>/summary.tsv`: one row per
    candidate and ranking (also returned) with its status (confirmed or exploratory), the
    ranking ("token" or "cell"), the sets tested (`n_sets`, each by prerank and by ORA:
    `n_tests`), the tests over all candidates, rankings and libraries (`n_tests_total`), and
    why a ranking was not tested. Tables of unconfirmed candidates carry the exploratory
    status in a first column.
    """
    rows = []
    for candidate in dict.fromkeys(genes["candidate"]):
        confirmed = bool(genes.loc[genes["candidate"] == candidate, "confirmed"].iloc[0])
        rankings = {"token": ranking_from_genes(genes, candidate)}
        if association is not None and (association["candidate"] == candidate).any():
            rankings["cell"] = ranking_from_association(association, candidate)
        for kind, ranking in rankings.items():
            folder = candidate_dirname(candidate) + RANKING_FOLDERS[kind]
            rows.append(_enrich_one(candidate, confirmed, kind, folder, ranking, gene_sets,
                                    settings, Path(out_dir)))  # fmt: skip
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:-1])
    summary["n_tests_total"] = int(summary["n_tests"].sum())
    write_tables({"summary.tsv": summary}, out_dir)
    return summary


def _enrich_one(candidate, confirmed, kind, folder, ranking, gene_sets, settings, out_dir) -> dict:
    """Prerank and ORA of one ranking into `out_dir/folder`; its summary row."""
    status = "confirmed" if confirmed else EXPLORATORY
    row = {"candidate": candidate, "confirmed": confirmed, "status": status, "ranking": kind,
           "folder": folder, "n_genes": len(ranking),
           "tied_fraction": tied_fraction(ranking)}  # fmt: skip
    reason = check_ties(ranking, settings.max_tied)
    if reason:
        log.warning("%s (%s ranking) not enriched: %s", candidate, kind, reason)
        return {**row, "n_sets": 0, "n_tests": 0, "reason": reason}
    tables, pre = enrich_ranking(ranking, gene_sets, settings)
    if not confirmed:
        tables = {
            name: t.assign(status=status)[["status", *t.columns]] for name, t in tables.items()
        }
    write_tables(tables, out_dir / folder)
    write_json(out_dir / folder / "gsea_curves.json", _curves_json(pre))
    table, ad = pre.table, ad_rows(pre.table)
    fdr = settings.fdr_threshold
    n_significant = int((table["FDR q-val"] < fdr).sum())
    log.info("%s (%s ranking): %d sets, %d at FDR < %g", candidate, kind, len(table),
             n_significant, fdr)  # fmt: skip
    return {
        **row,
        "n_sets": len(table),
        "n_tests": 2 * len(table),
        "n_significant": n_significant,
        "n_ad_significant": int((ad["FDR q-val"] < fdr).sum()),
        **_best(table, "top"),
        **_best(ad, "top_ad"),
        "reason": "",
    }
