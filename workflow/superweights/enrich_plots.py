"""Figures of the enrichment stage: GSEA running-sum plots and a dot plot of the top terms.

Drawn with matplotlib's object API (no pyplot, no global backend) from the ranking and the
gene sets, so they need no network and no gseapy result object.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .enrich import GeneSets, ad_rows, candidate_dirname, ranking_from_genes
from .outputs import save_figure


def running_sum(ranking: pd.Series, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """GSEA running sum (weight p = 1) along the ranking, highest score first, and hit indices.

    A hit adds |score| / (sum of |score| over hits); a miss subtracts 1 / (number of
    misses). The enrichment score is the value of largest magnitude. Matching ignores case.
    """
    ranking = ranking.sort_values(ascending=False, kind="stable")
    wanted = {g.upper() for g in genes}
    hits = np.array([g.upper() in wanted for g in ranking.index.astype(str)])
    if not hits.any() or hits.all():
        raise ValueError("a running sum needs genes both in and outside the set")
    weight = np.abs(ranking.to_numpy(dtype=float)) * hits
    up = weight / weight.sum() if weight.sum() > 0 else hits / hits.sum()
    down = ~hits / (~hits).sum()
    return np.cumsum(up - down), np.flatnonzero(hits)


def gseaplot(
    ranking: pd.Series, genes: Sequence[str], title: str, nes: float, fdr: float, path
) -> Path:
    """Running sum, hit positions and ranking metric of one gene set, saved as PNG."""
    res, hits = running_sum(ranking, genes)
    scores = ranking.sort_values(ascending=False, kind="stable").to_numpy(dtype=float)
    x = np.arange(len(scores))
    fig = Figure(figsize=(6.5, 5))
    ax_res, ax_hits, ax_rank = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 0.6, 1.5]}
    )
    ax_res.plot(x, res, color="tab:green", lw=1.5)
    ax_res.axhline(0, color="grey", lw=0.6)
    peak = int(np.argmax(np.abs(res)))
    ax_res.axvline(peak, color="tab:red", ls="--", lw=0.8)
    ax_res.set_ylabel("running ES")
    ax_res.set_title(f"{title}\nNES {nes:.2f}, FDR {fdr:.3g}", fontsize=9)
    ax_hits.vlines(hits, 0, 1, color="black", lw=0.5)
    ax_hits.set_yticks([])
    ax_rank.fill_between(x, scores, color="tab:grey", lw=0)
    ax_rank.set_ylabel("score")
    ax_rank.set_xlabel("gene rank")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def dotplot(table: pd.DataFrame, path, n_terms: int = 15, title: str = "") -> Path:
    """Top `n_terms` prerank rows: NES on x, colour -log10 FDR, dot area = set size."""
    top = table.head(n_terms)
    fig = Figure(figsize=(7.5, 0.35 * max(len(top), 3) + 1.2))
    ax = fig.subplots()
    if top.empty:
        ax.text(0.5, 0.5, "no gene set was tested", ha="center", va="center")
        ax.set_axis_off()
        return save_figure(fig, path, dpi=120, bbox_inches="tight")
    fdr = top["FDR"].astype(float).to_numpy()
    positive = fdr[fdr > 0]
    floor = positive.min() / 10 if positive.size else 1e-10
    y = np.arange(len(top))[::-1]
    dots = ax.scatter(
        top["NES"],
        y,
        s=20 + 180 * top["size"] / top["size"].max(),
        c=-np.log10(np.maximum(fdr, floor)),
        cmap="viridis",
    )
    labels = [_label(t, lib) for t, lib in zip(top["term"], top["library"], strict=True)]
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("NES")
    ax.set_title(title, fontsize=9)
    fig.colorbar(dots, ax=ax, label="-log10 FDR")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def _label(term: str, library: str, width: int = 60) -> str:
    term = term if len(term) <= width else term[: width - 1] + "…"
    return f"{term} [{library}]"


def _set_genes(gene_sets: GeneSets, library: str, term: str) -> list[str]:
    return gene_sets.get(library, {}).get(term, [])


def plot_candidate(
    ranking: pd.Series,
    gene_sets: GeneSets,
    prerank_table: pd.DataFrame,
    out_dir,
    n_terms: int = 5,
    title: str = "",
) -> list[Path]:
    """`dotplot.png`, plus `gsea_top<i>.png` for the `n_terms` top terms and
    `gsea_ad<i>.png` for the `n_terms` top AD terms, into `out_dir`."""
    out = Path(out_dir)
    paths = [dotplot(prerank_table, out / "dotplot.png", 3 * n_terms, title)]
    for prefix, rows in (("top", prerank_table), ("ad", ad_rows(prerank_table))):
        for i, row in enumerate(rows.head(n_terms).itertuples(index=False), 1):
            genes = _set_genes(gene_sets, row.library, row.term)
            name = f"{row.term} [{row.library}]"
            path = out / f"gsea_{prefix}{i}.png"
            paths.append(gseaplot(ranking, genes, name, row.NES, row.FDR, path))
    return paths


def plot_candidates(
    genes: pd.DataFrame, gene_sets: GeneSets, out_dir, n_terms: int = 5
) -> list[Path]:
    """Plots of every candidate whose `prerank.tsv` `enrich_candidates` wrote to `out_dir`."""
    paths = []
    for candidate in dict.fromkeys(genes["candidate"]):
        folder = Path(out_dir) / candidate_dirname(candidate)
        table = pd.read_csv(folder / "prerank.tsv", sep="\t")
        ranking = ranking_from_genes(genes, candidate)
        paths += plot_candidate(ranking, gene_sets, table, folder, n_terms, candidate)
    return paths
