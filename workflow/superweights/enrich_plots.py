"""Figures of the enrichment stage, drawn by gseapy (`dotplot`, `gseaplot`) from what was tested.

`enrich_candidates` writes each candidate's prerank table and gseapy's own running sums
(`gsea_curves.json`); these plots read them, so the plotted scores are the tested ones.
The q shown (dot colour, "FDR" of a running-sum plot) is `q_all_tests`, the BH (or BY) q
over every test of the ranking. The title of every figure of an unconfirmed (exploratory)
candidate says so.
"""

import json
from pathlib import Path

import gseapy
import pandas as pd

from .outputs import save_figure

DPI = 120


def dotplot(table: pd.DataFrame, path, title: str, n_terms: int = 15) -> Path | None:
    """gseapy's dot plot of the `n_terms` first prerank rows (NES on x, colour q_all_tests,
    dot size the leading edge's share of the set); None when no set was tested."""
    if table.empty:
        return None
    top = table.head(n_terms).copy()
    top["Term"] = [_label(t, lib) for t, lib in zip(top["Term"], top["library"], strict=True)]
    column = "q_all_tests" if (top["q_all_tests"].astype(float) > 0).any() else "NES"
    ax = gseapy.dotplot(
        top, column=column, x="NES", title=title, cutoff=1.0, top_term=n_terms,
        figsize=(9, 0.45 * len(top) + 1.8),
    )  # fmt: skip
    ax.axvline(0, color="grey", lw=0.6)
    return save_figure(ax.figure, path, dpi=DPI, bbox_inches="tight")


def gseaplot(rank_metric, curve: dict, path, exploratory: bool) -> Path:
    """gseapy's running-sum plot of one tested set (`curve`: an entry of gsea_curves.json)."""
    term = _label(curve["Term"], curve["library"])
    axes = gseapy.gseaplot(
        term=("EXPLORATORY: " if exploratory else "") + term,
        hits=curve["hits"],
        nes=curve["NES"],
        pval=curve["NOM p-val"],
        fdr=curve["q_all_tests"],
        RES=curve["RES"],
        rank_metric=rank_metric,
        figsize=(7, 5.5),
    )
    return save_figure(axes[0].figure, path, dpi=DPI, bbox_inches="tight")


def _label(term: str, library: str, width: int = 60) -> str:
    term = term if len(term) <= width else term[: width - 1] + "…"
    return f"{term} [{library}]"


def plot_candidate(folder, title: str, n_terms: int = 5, status: str = "") -> list[Path]:
    """`dotplot.png`, `gsea_top<i>.png` for the `n_terms` top terms and `gsea_ad<i>.png` for
    the `n_terms` top AD terms (prerank rows of `ad_terms.tsv`) of the candidate whose tables
    are in `folder`; a `status` other than confirmed (the summary's) goes into the titles."""
    folder = Path(folder)
    table = pd.read_csv(folder / "prerank.tsv", sep="\t")
    ad = pd.read_csv(folder / "ad_terms.tsv", sep="\t")
    saved = json.loads((folder / "gsea_curves.json").read_text())
    curves = {(c["library"], c["Term"]): c for c in saved["curves"]}
    exploratory = bool(status) and status != "confirmed"
    if exploratory:
        title = f"{title}: {status}"
    paths = [dotplot(table, folder / "dotplot.png", title, 3 * n_terms)]
    for prefix, rows in (("top", table), ("ad", ad[ad["analysis"] == "prerank"])):
        for i, row in enumerate(rows.head(n_terms).itertuples(index=False), 1):
            curve = curves[(row.library, row.Term)]
            path = folder / f"gsea_{prefix}{i}.png"
            paths.append(gseaplot(saved["rank_metric"], curve, path, exploratory))
    return [p for p in paths if p is not None]


def plot_candidates(out_dir, n_terms: int = 5) -> list[Path]:
    """Plots of every candidate that `enrich_candidates` tested into `out_dir`."""
    summary = pd.read_csv(Path(out_dir) / "summary.tsv", sep="\t")
    paths = []
    for row in summary.itertuples(index=False):
        folder = Path(out_dir) / row.folder
        if (folder / "gsea_curves.json").is_file():
            ranking = getattr(row, "ranking", "token")
            kind = "causal" if ranking == "causal" else f"{ranking}-level"
            title = f"{row.candidate}, {kind} ranking"
            paths += plot_candidate(folder, title, n_terms, status=row.status)
    return paths
