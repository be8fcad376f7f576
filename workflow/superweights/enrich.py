"""Gene-set enrichment of a super weight's gene ranking, calibrated on null weights.

A candidate has up to three rankings (`RANKINGS`), each enriched on its own:

- "causal" (primary): the causal gene ranking of the fine-tuned classifier, `path_z` of
  `gene_effects`' genes_causal.tsv (what the weight does to log p(true type) through each
  gene's token, against magnitude-matched null weights), its null weights' rankings from
  null_gene_effects.tsv (their `path_z`), each as centred ranks (`centred_ranks`: z spans
  many orders of magnitude); folder `<candidate>_causal`;
- "token" (descriptive, "where the unit fires"): the channel map's z-score per gene
  (`channels.py`), its null weights' rankings from channels' null_genes.tsv (`z`);
- "cell": the cell-level association's z (no null-weight rankings).

Libraries (library name -> set name -> genes): GO Biological Process 2023
and KEGG 2021 Human read from blitzgsea's package data, every `*.gmt` file of the packaged
`gene_sets`, GMT files named in config, and Enrichr libraries named in config (downloaded
through gseapy, so only when Enrichr can be reached). Every set within the size limits is
tested twice: preranked GSEA over the whole ranking (`gseapy.prerank`, "NOM p-val") and
over-representation of the top-ranked genes (`gseapy.enrich`, hypergeometric "P-value")
against the model's gene universe, every gene the map ranked. Tables keep gseapy's columns
(its per-library "FDR q-val" and "Adjusted P-value" too) and add:

- `q_all_tests`: Benjamini-Hochberg (or Benjamini-Yekutieli, `fdr_method`) over every test
  of the ranking, all libraries, prerank and ORA together; a set without overlap in ORA
  counts as a test with p = 1;
- `direction`: "enriched" (NES > 0, or over-represented) or "depleted" (NES < 0);
- `call`: the direction where q_all_tests <= `fdr_threshold`, else "not significant".
  Only "enriched" rows are hits; depleted ones are reported, never counted.

An AD hit is an enriched AD row (`ad_rows`: a curated AD library, or a term naming AD
biology). The AD hypothesis is also one pre-specified competitive test (`ad_test`): the
genes of `ad_test_sets` against the rest of the ranking, one-sided Mann-Whitney U (AD genes
score higher), with its own p, outside the BH family. Both are calibrated on null weights:
the same tests run on the rankings of `n_null_rankings` magnitude-matched null weights
(null_gene_effects.tsv or channels' null_genes.tsv, each scored like the candidate against
the other nulls), giving
the rate at which a null weight's ranking has an AD hit, and the rate of competitive p <=
`ad_test_level`. Cell-level rankings have no null-weight rankings (the cells stage writes
none), so their rates are not given. A ranking whose scores are largely tied is not tested
(the result would depend on how ties are ordered). Symbols are matched case-insensitively
and reported as the ranking spells them. Weights that pruning did not confirm are enriched
only on request, and everything about them is marked exploratory.
"""

import logging
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blitzgsea.enrichr
import gseapy
import numpy as np
import pandas as pd
import requests
from scipy.stats import false_discovery_control, mannwhitneyu, rankdata

from .errors import UserError
from .genes import read_gmt
from .outputs import named_paths, write_json, write_tsv
from .settings import EnrichSettings, GeneSetSettings

log = logging.getLogger(__name__)

GeneSets = dict[str, dict[str, list[str]]]
"""Gene-set libraries: library name -> set name -> genes."""

AD_LIBRARIES = ("alzheimers_curated", "bellenguez2022_gwas")
AD_PATTERN = re.compile(r"alzheimer|amyloid|\btau\b|tauopath|microglia|tyrobp", re.IGNORECASE)
ENRICHR_HOST = ("maayanlab.cloud", 443)

PRERANK_COLUMNS = ["library", "Term", "size", "ES", "NES", "NOM p-val", "FDR q-val", "Tag %",
                   "Lead_genes"]  # fmt: skip
ORA_COLUMNS = ["library", "Term", "size", "Overlap", "Odds Ratio", "Combined Score", "P-value",
               "Adjusted P-value", "Genes"]  # fmt: skip
"""gseapy's result columns (res2d), with the library and the set's size in the ranking."""
P_FDR = {"prerank": ("NOM p-val", "FDR q-val"), "ora": ("P-value", "Adjusted P-value")}
CALL_COLUMNS = ["direction", "q_all_tests", "call"]
"""Added to gseapy's columns: direction, BH (or BY) q over every test of the ranking, call."""
ENRICHED, DEPLETED, NOT_SIGNIFICANT = "enriched", "depleted", "not significant"
OUTPUT_FILES = ("prerank.tsv", "ora.tsv", "ad_terms.tsv")
EXPLORATORY = "exploratory (weight not confirmed by pruning)"
HIT_COLUMNS = [
    "n_tests", "n_enriched", "n_depleted", "n_ad_enriched", "ad_hit", "top_ad_term",
    "top_ad_library", "top_ad_q", "ad_test_n_genes", "ad_test_auc", "ad_test_p",
]  # fmt: skip
"""What one ranking's tests found: sets counted once across prerank and ORA; `top_ad_*` the
enriched AD row (either analysis) of smallest q_all_tests; the competitive AD test."""
NULL_RANKING_COLUMNS = ["candidate", "ranking", "weight", "null", "null_row", "null_col",
                        "n_genes", *HIT_COLUMNS, "reason"]  # fmt: skip
"""null_rankings.tsv: the candidate's row (weight "candidate"), then one per null weight
(weight "null weight")."""
NULL_WEIGHT = "null weight"
CALIBRATION_COLUMNS = ["n_null_rankings", "null_ad_hit_rate", "null_any_hit_rate",
                       "null_ad_test_rate", "ad_test_p_null", "null_reason"]  # fmt: skip
SUMMARY_COLUMNS = [
    "candidate", "confirmed", "status", "ranking", "role", "folder", "n_genes", "tied_fraction",
    "n_sets", "n_tests", "n_significant", "n_ad_significant", "top_term", "top_library",
    "top_NES", "top_FDR", "top_ad_term", "top_ad_library", "top_ad_NES", "top_ad_FDR", "reason",
    "n_enriched", "n_depleted", "n_ad_enriched", "ad_hit", "ad_test_n_genes", "ad_test_auc",
    "ad_test_p", *CALIBRATION_COLUMNS, "n_tests_total",
]  # fmt: skip


# --- gene-set libraries -----------------------------------------------------------------


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


def _by_p(frames: list[pd.DataFrame], columns: list[str], analysis: str) -> pd.DataFrame:
    """The libraries' rows together, by p, then decreasing |effect| (the order of
    `q_all_tests`, which BH keeps monotone in p)."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)[columns]
    p = P_FDR[analysis][0]
    effect = "NES" if analysis == "prerank" else "Odds Ratio"
    order = table.assign(_effect=-table[effect].abs())
    order = order.sort_values([p, "_effect", "library", "Term"])
    return table.loc[order.index].reset_index(drop=True)


@dataclass
class Prerank:
    """Preranked GSEA: one row per tested set (`PRERANK_COLUMNS`), by p then |NES|; the
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
    associated) in each library; FDR q-val is gseapy's, within the library. With the
    permutation method, NOM p-val is floored at 1 / (permutation_num + 1): gseapy reports 0
    when no permutation reaches the observed ES, which BH would turn into q = 0."""
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
        if settings.method == "permutation":
            res["NOM p-val"] = res["NOM p-val"].clip(lower=1 / (settings.permutation_num + 1))
        res = _by_p([res], PRERANK_COLUMNS, "prerank")
        frames.append(res)
        by_term = res.set_index("Term")
        for term in [*res["Term"].head(keep_curves), *ad_rows(res)["Term"].head(keep_curves)]:
            run, tested = result.results[term], by_term.loc[term, ["NES", "NOM p-val", "FDR q-val"]]
            curve = {"hits": list(map(int, run["hits"])), "RES": run["RES"], **tested.to_dict()}
            curves[(library, term)] = curve
    return Prerank(_by_p(frames, PRERANK_COLUMNS, "prerank"), ranking, curves)


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
    return _by_p(frames, ORA_COLUMNS, "ora")


def n_tests(ranking: pd.Series, gene_sets: GeneSets, settings: EnrichSettings) -> int:
    """Tests `enrich_ranking` runs on the ranking: every set within the size limits, once by
    prerank and once by ORA (the size of the `q_all_tests` family)."""
    genes = _clean_ranking(ranking).index
    sizes = [
        len(_matched(sets, genes, settings.min_size_of(library), settings.max_size))
        for library, sets in gene_sets.items()
    ]
    return 2 * sum(sizes)


def with_calls(
    pre: pd.DataFrame, over: pd.DataFrame, m: int, settings: EnrichSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables with `CALL_COLUMNS`: q over the `m` tests of the ranking (listed p-values
    plus p = 1 for every unlisted test, i.e. ORA sets without overlap), the direction
    (NES sign; ORA is one-sided, over-representation) and the call at `fdr_threshold`."""
    p = pd.concat([pre["NOM p-val"], over["P-value"]]).astype(float).fillna(1.0).to_numpy()
    if len(p) > m:
        raise ValueError(f"{len(p)} p-values listed for {m} tests")
    q = false_discovery_control(np.concatenate([p, np.ones(m - len(p))]),
                                method=settings.fdr_method)[: len(p)]  # fmt: skip
    nes = pre["NES"].astype(float)
    directions = [
        np.where(nes > 0, ENRICHED, np.where(nes < 0, DEPLETED, "none")),
        np.full(len(over), ENRICHED),
    ]
    out = []
    for table, direction, q_part in zip((pre, over), directions, (q[: len(pre)], q[len(pre) :]),
                                        strict=True):  # fmt: skip
        called = np.where(q_part <= settings.fdr_threshold, direction, NOT_SIGNIFICANT)
        out.append(table.assign(direction=direction, q_all_tests=q_part, call=called))
    return out[0], out[1]


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
    ranking: pd.Series, gene_sets: GeneSets, settings: EnrichSettings, keep_curves: int = 5
) -> tuple[dict[str, pd.DataFrame], Prerank]:
    """Prerank, ORA of the top `ora_top_n` genes against all ranked genes, and their AD
    rows, with `CALL_COLUMNS`, as {file name: table}, with the prerank result (its curves
    carry q_all_tests)."""
    pre = prerank(ranking, gene_sets, settings, keep_curves)
    over = ora(top_genes(ranking, settings.ora_top_n), ranking.index, gene_sets, settings)
    pre.table, over = with_calls(pre.table, over, n_tests(ranking, gene_sets, settings), settings)
    q = pre.table.set_index(["library", "Term"])["q_all_tests"]
    for key, curve in pre.curves.items():
        curve["q_all_tests"] = float(q.loc[key])
    ad = pd.concat(
        [ad_rows(pre.table).assign(analysis="prerank"), ad_rows(over).assign(analysis="ora")],
        ignore_index=True,
    )
    columns = ["analysis", *PRERANK_COLUMNS, *(c for c in ORA_COLUMNS if c not in PRERANK_COLUMNS),
               *CALL_COLUMNS]  # fmt: skip
    tables = {
        "prerank.tsv": pre.table,
        "ora.tsv": over,
        "ad_terms.tsv": ad.reindex(columns=columns),
    }
    return tables, pre


def ad_test_genes(gene_sets: GeneSets, names: Sequence[str]) -> list[str]:
    """The genes of the competitive AD test: every set of each library named, or the set
    named as "library:set"; a UserError names what is not loaded."""
    genes: dict[str, None] = {}
    for name in names:
        library, _, term = name.partition(":")
        if library not in gene_sets:
            raise UserError(
                f"enrich.ad_test_sets names {name!r}, but no gene-set library {library!r} is "
                f"loaded (loaded: {', '.join(gene_sets)})"
            )
        if term and term not in gene_sets[library]:
            raise UserError(f"enrich.ad_test_sets names {name!r}: {library} has no set {term!r}")
        chosen = [gene_sets[library][term]] if term else gene_sets[library].values()
        genes.update(dict.fromkeys(g for s in chosen for g in s))
    return list(genes)


def ad_test(ranking: pd.Series, genes: Iterable[str]) -> dict:
    """The pre-specified competitive AD test: `genes` (matched case-insensitively) against
    the rest of the ranking, one-sided Mann-Whitney U (`scipy.stats.mannwhitneyu`, AD genes
    score higher). `ad_test_auc`: U / (n_AD n_rest), the chance that an AD gene outscores
    another gene (0.5 under the null). NaN where either group is empty."""
    scores = _clean_ranking(ranking)
    wanted = {g.upper() for g in genes}
    inside = scores.index.str.upper().isin(wanted)
    n_ad, n_rest = int(inside.sum()), int((~inside).sum())
    if not n_ad or not n_rest:
        return {"ad_test_n_genes": n_ad, "ad_test_auc": np.nan, "ad_test_p": np.nan}
    result = mannwhitneyu(scores[inside], scores[~inside], alternative="greater")
    return {"ad_test_n_genes": n_ad, "ad_test_auc": float(result.statistic) / (n_ad * n_rest),
            "ad_test_p": float(result.pvalue)}  # fmt: skip


def hits(tables: Mapping[str, pd.DataFrame]) -> dict:
    """What `enrich_ranking`'s tables found: tests, distinct sets called enriched (prerank or
    ORA), depleted (prerank), AD sets enriched, and the best enriched AD row by q."""
    both = pd.concat([tables["prerank.tsv"], tables["ora.tsv"]], ignore_index=True)
    enriched = both[both["call"] == ENRICHED].sort_values("q_all_tests", kind="stable")
    ad = ad_rows(enriched)
    best = ad.iloc[0] if len(ad) else pd.Series(dtype=object)
    return {
        "n_enriched": len(enriched.drop_duplicates(["library", "Term"])),
        "n_depleted": len(both[both["call"] == DEPLETED].drop_duplicates(["library", "Term"])),
        "n_ad_enriched": len(ad.drop_duplicates(["library", "Term"])),
        "ad_hit": bool(len(ad)),
        "top_ad_term": best.get("Term", np.nan),
        "top_ad_library": best.get("library", np.nan),
        "top_ad_q": best.get("q_all_tests", np.nan),
    }


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


CAUSAL_STATISTICS = ("path_z", "expr_z")
"""The causal ranking's statistic in genes_causal.tsv and null_gene_effects.tsv: the cell-type
log-likelihood's (a fine-tuned classifier) or the masked-expression objective's (a starting
checkpoint, gene_effects_base)."""


def causal_statistic(table: pd.DataFrame) -> str:
    """The `CAUSAL_STATISTICS` column a causal gene table carries."""
    found = [c for c in CAUSAL_STATISTICS if c in table.columns]
    if len(found) != 1:
        raise UserError(
            f"a causal gene table needs exactly one of the columns {list(CAUSAL_STATISTICS)}, "
            f"found {found}; rerun gene_effects"
        )
    return found[0]


def centred_ranks(scores: pd.Series) -> pd.Series:
    """Scores replaced by their ranks (ties averaged), centred and scaled to (-1/2, 1/2);
    NaN stays NaN. The causal rankings' z-scores span many orders of magnitude (a gene's null
    sd can be 1e-7 nats), and preranked GSEA steps through a set by each gene's |score|, so
    one gene with an enormous z would decide the enrichment of every set holding it: a set of
    16 planted genes at ranks 1-9 of 341 got p 0.06, as random sets holding the top gene
    reach the same score. Ranks keep the order and give no gene such weight."""
    values = pd.to_numeric(scores, errors="coerce").astype(float)
    finite = np.isfinite(values.to_numpy())
    out = pd.Series(np.nan, index=scores.index, dtype=float)
    n = int(finite.sum())
    if n:
        out[finite] = (rankdata(values[finite].to_numpy()) - (n + 1) / 2) / n
    return out


def ranking_from_causal(genes_causal: pd.DataFrame, candidate: str) -> pd.Series:
    """A candidate's causal gene ranking: the `centred_ranks` of its z-scores
    (`causal_statistic` of gene_effects' or gene_effects_base's genes_causal.tsv); empty
    where it ranked no gene."""
    statistic = causal_statistic(genes_causal)
    missing = [c for c in ("candidate", "gene") if c not in genes_causal]
    if missing:
        raise UserError(f"the causal gene table lacks column(s) {missing}; rerun gene_effects")
    rows = genes_causal[genes_causal["candidate"] == candidate]
    return centred_ranks(rows.set_index("gene")[statistic])


RANKINGS = ("causal", "token", "cell")
"""The rankings in the order they are enriched and listed."""
RANKING_FOLDERS = {"causal": "_causal", "token": "", "cell": "_cell"}
"""Folder suffix of each ranking: causal (gene_effects), token-level (channel map) or
cell-level (association)."""
RANKING_ROLES = {"causal": "primary", "token": "descriptive: where the unit fires",
                 "cell": "cell-level association"}  # fmt: skip
"""The `role` column of summary.tsv: the causal ranking is the primary one."""
RANKING_INPUTS = ("genes", "association", "null_genes", "causal", "null_causal")
"""`run`'s inputs by name: the tables of `enrich_candidates` (the channel map's, the cells
stage's and the causal rankings, and their null weights' rankings)."""


def candidate_dirname(candidate: str) -> str:
    """A file-system-safe folder name for a candidate id such as 'L2[3,5]' -> 'L2_3_5'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", candidate).strip("_")


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each table as TSV into `out_dir`, each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_tsv(out / name, table) for name, table in tables.items()]


def _best(table: pd.DataFrame, prefix: str) -> dict:
    """The enriched (NES > 0) prerank row of smallest q_all_tests: term, library, NES, q."""
    positive = table[table["direction"] == ENRICHED] if len(table) else table
    top = positive.iloc[0] if len(positive) else pd.Series(dtype=object)
    keys = {"term": "Term", "library": "library", "NES": "NES", "FDR": "q_all_tests"}
    return {f"{prefix}_{k}": top.get(c, np.nan) for k, c in keys.items()}


def _curves_json(pre: Prerank) -> dict:
    """The running sums gseapy tested, for `enrich_plots` (gseaplot's inputs)."""
    return {
        "rank_metric": pre.ranking.tolist(),
        "curves": [{"library": lib, "Term": term, **c} for (lib, term), c in pre.curves.items()],
    }


def null_rankings(
    null_genes: pd.DataFrame, candidate: str, n: int, column: str = "z"
) -> list[tuple[dict, pd.Series]]:
    """The first `n` null weights' rankings of a candidate from channels' null_genes.tsv
    (`column` "z") or gene_effects' null_gene_effects.tsv (`column` a `CAUSAL_STATISTICS`)
    (candidate, null, gene, `column`; null_row, null_col when present), as ({null, null_row,
    null_col}, `column` per gene; its `centred_ranks` for a causal statistic, as the
    candidate's `ranking_from_causal`)."""
    needed = ("candidate", "null", "gene", column)
    missing = [c for c in needed if c not in null_genes.columns]
    if missing:
        raise UserError(
            f"the null-weight gene table lacks column(s) {missing}; rerun the stage that wrote "
            "it (channels or gene_effects)"
        )
    rows = null_genes[null_genes["candidate"] == candidate]
    out = []
    for null, part in list(rows.groupby("null", sort=False))[:n]:
        where = {"null": null, **{k: part[k].iloc[0] for k in ("null_row", "null_col")
                                  if k in part.columns}}  # fmt: skip
        scores = part.set_index("gene")[column].astype(float)
        out.append((where, centred_ranks(scores) if column in CAUSAL_STATISTICS else scores))
    return out


def _test_ranking(ranking, gene_sets, settings, ad_genes, keep_curves=0):
    """Tables, prerank result and `HIT_COLUMNS` of one ranking; or why it is not tested
    (empty, or too tied)."""
    if not np.isfinite(pd.to_numeric(ranking, errors="coerce").to_numpy(dtype=float)).any():
        return None, None, {"reason": "no gene is ranked (none passed the stage's min_cells)"}
    reason = check_ties(ranking, settings.max_tied)
    if reason:
        return None, None, {"reason": reason}
    tables, pre = enrich_ranking(ranking, gene_sets, settings, keep_curves)
    found = {"n_tests": n_tests(ranking, gene_sets, settings), **hits(tables),
             **ad_test(ranking, ad_genes), "reason": ""}  # fmt: skip
    return tables, pre, found


def calibrate(rows: pd.DataFrame, settings: EnrichSettings) -> dict:
    """`CALIBRATION_COLUMNS` of a candidate's ranking from its `null_rankings.tsv` rows: how
    often a tested null weight's ranking had an AD hit, any hit, and a competitive p at or
    below `ad_test_level`, and the candidate's competitive p among the nulls',
    (1 + #{null p <= p}) / (1 + n)."""
    own = rows[rows["weight"] == "candidate"].iloc[0]
    nulls = rows[(rows["weight"] == NULL_WEIGHT) & (rows["reason"].fillna("") == "")]
    if nulls.empty:
        reason = "no null-weight ranking could be tested" if len(rows) > 1 else ""
        return {"n_null_rankings": 0, "null_reason": reason or "no null-weight rankings"}
    null_p = nulls["ad_test_p"].astype(float)
    return {
        "n_null_rankings": len(nulls),
        "null_ad_hit_rate": nulls["ad_hit"].astype(bool).mean(),
        "null_any_hit_rate": (nulls["n_enriched"] > 0).mean(),
        "null_ad_test_rate": (null_p <= settings.ad_test_level).mean(),
        "ad_test_p_null": (1 + (null_p <= own["ad_test_p"]).sum()) / (1 + len(nulls)),
        "null_reason": "",
    }


def enrich_candidates(
    genes: pd.DataFrame | None,
    gene_sets: GeneSets,
    settings: EnrichSettings,
    out_dir: str | Path,
    association: pd.DataFrame | None = None,
    null_genes: pd.DataFrame | None = None,
    causal: pd.DataFrame | None = None,
    null_causal: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Enrich every candidate of `causal` (gene_effects' or gene_effects_base's
    genes_causal.tsv, its `causal_statistic`: the primary ranking) and of the channel map's
    gene table `genes` (its "all" stratum: the token-level ranking) and, with `association`
    (`cell_map`'s table), the same candidates' cell-level z-scores; with `null_causal`
    (null_gene_effects.tsv) and `null_genes` (channels' null_genes.tsv), the first
    `n_null_rankings` null weights' rankings of each candidate alike, beside its causal and
    token-level rankings.

    Writes `<out_dir>/<candidate_dirname>[_causal|_cell]/{prerank,ora,ad_terms}.tsv` and
    `gsea_curves.json` (what `enrich_plots` draws), `<out_dir>/null_rankings.tsv`
    (`NULL_RANKING_COLUMNS`: per candidate and ranking, its own row and each null weight's)
    and `<out_dir>/summary.tsv` (`SUMMARY_COLUMNS`, also returned): one row per candidate and
    ranking (causal, token, cell, in this order) with its status (confirmed or exploratory),
    the ranking and its `role` (`RANKING_ROLES`), the sets tested (`n_sets`, each by prerank
    and by ORA: `n_tests`), the sets called enriched and depleted (`n_enriched` =
    `n_significant`, `n_ad_enriched` = `n_ad_significant`: enriched only), the best enriched
    prerank row (`top_*`; `top_FDR` is its q_all_tests), the competitive AD test, the null-
    weight rates (`CALIBRATION_COLUMNS`), the tests over all candidates and rankings
    (`n_tests_total`), and why a ranking was not tested. Tables of unconfirmed candidates
    carry the exploratory status in a first column.
    """
    ad_genes = ad_test_genes(gene_sets, settings.ad_test_sets)
    null_tables = {"token": (null_genes, "z")}
    if null_causal is not None:
        null_tables["causal"] = (null_causal, causal_statistic(null_causal))
    tables = [t for t in (causal, genes) if t is not None]
    rows, null_rows = [], []
    for candidate in dict.fromkeys(c for t in tables for c in t["candidate"]):
        confirmed = next(bool(t.loc[t["candidate"] == candidate, "confirmed"].iloc[0])
                         for t in tables if (t["candidate"] == candidate).any())  # fmt: skip
        rankings = {}
        if causal is not None:
            rankings["causal"] = ranking_from_causal(causal, candidate)
        if genes is not None and (genes["candidate"] == candidate).any():
            rankings["token"] = ranking_from_genes(genes, candidate)
        if association is not None and (association["candidate"] == candidate).any():
            rankings["cell"] = ranking_from_association(association, candidate)
        for kind, ranking in rankings.items():
            folder = candidate_dirname(candidate) + RANKING_FOLDERS[kind]
            row, found = _enrich_one(candidate, confirmed, kind, folder, ranking, gene_sets,
                                     settings, Path(out_dir), ad_genes)  # fmt: skip
            nulls = null_tables.get(kind, (None, ""))
            if found["reason"]:
                nulls = (None, "")
            table = _null_table(row, found, nulls, gene_sets, settings, ad_genes)
            null_rows.append(table)
            rows.append({**row, **calibrate(table, settings)})
            if found["reason"]:
                rows[-1]["null_reason"] = "the candidate's ranking was not tested"
            elif kind == "cell":
                rows[-1]["null_reason"] = "the cells stage writes no null-weight rankings"
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:-1])
    summary["n_tests_total"] = int(summary["n_tests"].sum())
    empty = pd.DataFrame(columns=NULL_RANKING_COLUMNS)
    null_table = pd.concat(null_rows, ignore_index=True) if null_rows else empty
    write_tables({"null_rankings.tsv": null_table, "summary.tsv": summary}, out_dir)
    return summary


def _null_table(row, found, nulls, gene_sets, settings, ad_genes) -> pd.DataFrame:
    """`null_rankings.tsv` rows of one ranking: the candidate's (`found`), then its null
    weights' (`nulls`: (null-weight gene table, its statistic); none without a table)."""
    where = {"candidate": row["candidate"], "ranking": row["ranking"]}
    rows = [{**where, "weight": "candidate", "n_genes": row["n_genes"], **found}]
    rows += _null_rows(where, row["candidate"], *nulls, gene_sets, settings, ad_genes)
    table = pd.DataFrame(rows, columns=NULL_RANKING_COLUMNS)
    return table.astype(dict.fromkeys(["null", "null_row", "null_col"], "Int64"))


def _null_rows(where, candidate, null_genes, column, gene_sets, settings,
               ad_genes) -> list[dict]:  # fmt: skip
    """`null_rankings.tsv` rows of a candidate's null weights (none without `null_genes`),
    ranked by their `column`."""
    if null_genes is None or not settings.n_null_rankings:
        return []
    found = null_rankings(null_genes, candidate, settings.n_null_rankings, column)
    if len(found) < settings.n_null_rankings:
        log.warning(
            "%s (%s ranking): %d null-weight rankings, fewer than n_null_rankings = %d (raise "
            "the n_null of %s)", candidate, where["ranking"], len(found),
            settings.n_null_rankings, "genes" if where["ranking"] == "causal" else "channels",
        )  # fmt: skip
    rows = []
    for null, ranking in found:
        result = _test_ranking(ranking, gene_sets, settings, ad_genes)[2]
        rows.append({**where, "weight": NULL_WEIGHT, **null, "n_genes": len(ranking), **result})
    hit_rate = np.mean([bool(r.get("ad_hit")) for r in rows]) if rows else np.nan
    log.info("%s: %d null-weight rankings, AD hit rate %.2f", candidate, len(rows), hit_rate)
    return rows


def _enrich_one(candidate, confirmed, kind, folder, ranking, gene_sets, settings, out_dir,
                ad_genes) -> tuple[dict, dict]:  # fmt: skip
    """Prerank, ORA and the competitive AD test of one ranking into `out_dir/folder`; its
    summary row and its `HIT_COLUMNS`."""
    status = "confirmed" if confirmed else EXPLORATORY
    row = {"candidate": candidate, "confirmed": confirmed, "status": status, "ranking": kind,
           "role": RANKING_ROLES[kind], "folder": folder, "n_genes": len(ranking),
           "tied_fraction": tied_fraction(ranking)}  # fmt: skip
    tables, pre, found = _test_ranking(ranking, gene_sets, settings, ad_genes, keep_curves=5)
    if tables is None:
        log.warning("%s (%s ranking) not enriched: %s", candidate, kind, found["reason"])
        return {**row, "n_sets": 0, "n_tests": 0, **found}, found
    if not confirmed:
        tables = {
            name: t.assign(status=status)[["status", *t.columns]] for name, t in tables.items()
        }
    write_tables(tables, out_dir / folder)
    write_json(out_dir / folder / "gsea_curves.json", _curves_json(pre))
    table = pre.table
    log.info("%s (%s ranking): %d tests, %d sets enriched, %d depleted at q <= %g; "
             "competitive AD test p = %.3g", candidate, kind, found["n_tests"],
             found["n_enriched"], found["n_depleted"], settings.fdr_threshold,
             found["ad_test_p"])  # fmt: skip
    summary = {key: found[key] for key in SUMMARY_COLUMNS if key in found}
    return {
        **row,
        "n_sets": len(table),
        **summary,
        "n_significant": found["n_enriched"],
        "n_ad_significant": found["n_ad_enriched"],
        **_best(table, "top"),
        **_best(ad_rows(table), "top_ad"),
    }, found


def run(inputs, outputs, settings: EnrichSettings, *, gene_sets: GeneSetSettings) -> pd.DataFrame:
    """The enrichment stage: `enrich_candidates` of the `RANKING_INPUTS` among `inputs` with
    the libraries of `gene_sets`; write its tables and figures (`enrich_plots`) into
    `outputs`, a folder (or named outputs with the folder `enrich`). Returns the summary."""
    from .enrich_plots import plot_candidates

    tables = {
        name: pd.read_csv(inputs[name], sep="\t") if inputs.get(name) else None
        for name in RANKING_INPUTS
    }
    out_dir = named_paths(outputs, {"enrich": ""})["enrich"]
    summary = enrich_candidates(
        tables["genes"],
        load_gene_sets(gene_sets),
        settings,
        out_dir,
        tables["association"],
        tables["null_genes"],
        tables["causal"],
        tables["null_causal"],
    )
    plot_candidates(out_dir)
    return summary
