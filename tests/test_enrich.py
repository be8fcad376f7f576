"""Gene-set libraries, GMT validation, prerank/ORA on planted data, q over all tests and
directions, the competitive AD test and its calibration on null rankings, AD rows, plots."""

import socket

import blitzgsea.enrichr
import gseapy
import numpy as np
import pandas as pd
import pytest
import requests
from scipy.stats import binom, hypergeom, kstest
from statsmodels.stats.multitest import multipletests

from superweights import enrich
from superweights.enrich import EnrichSettings, GeneSetSettings
from superweights.enrich_plots import plot_candidate, plot_candidates
from superweights.errors import UserError
from superweights.genes import GENE_SETS_DIR, read_gmt

GENES = [f"GENE{i}" for i in range(1500)]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def planted():
    """A ranking whose top 30 genes form `planted`, plus 20 random sets of the same size."""
    rng = np.random.default_rng(7)
    scores = np.sort(rng.normal(size=len(GENES)))[::-1] + np.linspace(0.001, 0, len(GENES))
    ranking = pd.Series(scores, index=GENES)
    sets = {"planted": GENES[:30]}
    for i in range(20):
        sets[f"random{i}"] = list(rng.choice(GENES, 30, replace=False))
    return ranking, {"toy": sets}


def toy_settings(**kwargs):
    """Settings for the toy libraries: the competitive test's AD genes are the set 'planted'."""
    return EnrichSettings(**{"min_size": 10, "permutation_num": 100, "ora_top_n": 30,
                             "ad_test_sets": ("toy:planted",), **kwargs})  # fmt: skip


def write(tmp_path, text, name="sets.gmt"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- GMT files --------------------------------------------------------------------------


def test_read_gmt_skips_comments_and_blank_lines(tmp_path):
    path = write(tmp_path, "# source: test\nA\tdesc\tX\tY\tX\n\nB\t\tZ\t\n")
    assert read_gmt(path) == {"A": ["X", "Y"], "B": ["Z"]}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("A\tdesc\tX\nB\tdesc\n", ":2:"),
        ("A\tdesc\tX\nB\n", ":2:"),
        ("A\tdesc\t\t\n", ":1:"),
        ("\tdesc\tX\n", ":1:"),
        ("A\tdesc\tX\nB\tdesc\tY\nA\tagain\tZ\n", ":3:"),
    ],
)
def test_read_gmt_bad_lines_name_file_and_line(tmp_path, text, where):
    path = write(tmp_path, text, "bad.gmt")
    with pytest.raises(UserError, match=rf"bad\.gmt{where}"):
        read_gmt(path)


def test_read_gmt_duplicate_names_the_first_line(tmp_path):
    path = write(tmp_path, "A\td\tX\nB\td\tY\nA\td\tZ\n")
    with pytest.raises(UserError, match="appears again.*first on line 1"):
        read_gmt(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_read_gmt_empty_file(tmp_path, text):
    with pytest.raises(UserError, match="empty.gmt holds no gene sets"):
        read_gmt(write(tmp_path, text, "empty.gmt"))


def test_read_gmt_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_gmt(tmp_path / "nope.gmt")


def test_shipped_curated_sets():
    curated = read_gmt(GENE_SETS_DIR / "alzheimers_curated.gmt")
    assert curated["AD_CORE_GENES"] == ["APP", "MAPT", "APOE", "TREM2", "PSEN1", "PSEN2"]
    assert "TYROBP" in curated["DAM_MICROGLIA_UP_KEREN_SHAUL_2017"]
    gwas = read_gmt(GENE_SETS_DIR / "bellenguez2022_gwas.gmt")
    (genes,) = gwas.values()
    assert len(genes) >= 75 and {"APOE", "BIN1", "TREM2", "SORL1", "PLCG2"} <= set(genes)


# --- libraries --------------------------------------------------------------------------


def test_packaged_libraries_load_offline_with_ad_facts(no_network):
    kegg = enrich.packaged_library("KEGG_2021_Human")
    assert len(kegg) == 320
    ad = set(kegg["Alzheimer disease"])
    assert len(ad) == 369
    assert {"APP", "MAPT", "APOE", "PSEN1", "PSEN2", "BACE1", "GSK3B", "CDK5"} <= ad
    assert "TREM2" not in ad
    assert len(enrich.packaged_library("GO_Biological_Process_2023")) == 5407
    theirs = blitzgsea.enrichr.get_library("KEGG_2021_Human")
    assert {k: set(v) for k, v in kegg.items()} == {k: set(v) for k, v in theirs.items()}


def test_unknown_packaged_library_lists_the_shipped_ones():
    with pytest.raises(UserError, match="'Reactome_2022'.*KEGG_2021_Human"):
        enrich.packaged_library("Reactome_2022")


def test_load_gene_sets_combines_all_sources(tmp_path, no_network):
    extra = write(tmp_path, "MINE\td\tAPP\tAPOE\n", "mine.gmt")
    libraries = enrich.load_gene_sets(
        GeneSetSettings(packaged=("KEGG_2021_Human",), gmt_files=(str(extra),))
    )
    assert list(libraries) == [
        "KEGG_2021_Human", "alzheimers_curated", "bellenguez2022_gwas", "mine"
    ]  # fmt: skip
    assert libraries["mine"] == {"MINE": ["APP", "APOE"]}


def test_library_names_must_be_unique(tmp_path):
    clash = write(tmp_path, "X\td\tAPP\n", "alzheimers_curated.gmt")
    with pytest.raises(UserError, match="two gene-set libraries are named 'alzheimers_curated'"):
        enrich.load_gene_sets(GeneSetSettings(packaged=(), gmt_files=(str(clash),)))


def test_enrichr_library_offline_names_it(monkeypatch):
    monkeypatch.setattr(enrich, "ENRICHR_HOST", ("127.0.0.1", 9))
    settings = GeneSetSettings(packaged=(), resource_dir="", enrichr=("WikiPathways_2024_Human",))
    with pytest.raises(UserError, match="'WikiPathways_2024_Human'.*cannot be reached"):
        enrich.load_gene_sets(settings)


def test_enrichr_download_failure_names_it(monkeypatch):
    class Reachable:
        def close(self):
            pass

    def fail(**kwargs):
        raise requests.ConnectionError("connection reset")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Reachable())
    monkeypatch.setattr(gseapy, "get_library", fail)
    with pytest.raises(UserError, match="'Reactome_2022'"):
        enrich.enrichr_library("Reactome_2022")


# --- tests of enrichment ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["multilevel", "permutation"])
def test_prerank_finds_the_planted_set(planted, method):
    ranking, sets = planted
    settings = EnrichSettings(method=method, permutation_num=200, min_size=10)
    table = enrich.prerank(ranking, sets, settings).table
    assert list(table.columns) == enrich.PRERANK_COLUMNS
    top = table.iloc[0]
    assert top["Term"] == "planted" and top["NES"] > 2.5 and top["FDR q-val"] < 0.01
    assert set(top["Lead_genes"].split(";")) <= set(GENES[:30])
    random = table[table["Term"] != "planted"]
    assert len(random) == 20
    assert (random["NES"].abs() < top["NES"]).all()
    assert (random["FDR q-val"] > 0.05).mean() >= 0.9


def test_prerank_is_seeded(planted):
    ranking, sets = planted
    settings = EnrichSettings(min_size=10)
    pd.testing.assert_frame_equal(
        enrich.prerank(ranking, sets, settings).table, enrich.prerank(ranking, sets, settings).table
    )


def test_prerank_keeps_the_running_sums_it_tested(planted):
    ranking, sets = planted
    result = enrich.prerank(ranking, sets, EnrichSettings(min_size=10), keep_curves=2)
    assert list(result.curves) == [("toy", t) for t in result.table["Term"].head(2)]
    for (_, term), curve in result.curves.items():
        res = np.asarray(curve["RES"])
        row = result.table.set_index("Term").loc[term]
        assert res[np.argmax(np.abs(res))] == pytest.approx(row["ES"], abs=1e-6)
        hit_genes = set(result.ranking.index[curve["hits"]])
        assert hit_genes == set(sets["toy"][term]) and curve["NES"] == row["NES"]


def test_prerank_matches_symbols_ignoring_case():
    genes = [f"C{i}orf{i}" for i in range(300)]
    ranking = pd.Series(np.linspace(2, -2, 300), index=genes)
    sets = {"lib": {"top": [g.upper() for g in genes[:20]], "other": genes[100:140]}}
    table = enrich.prerank(ranking, sets, EnrichSettings(min_size=10, permutation_num=100)).table
    top = table.set_index("Term").loc["top"]
    assert top["size"] == 20 and set(top["Lead_genes"].split(";")) <= set(genes[:20])


def test_sets_outside_the_size_limits_are_not_tested(planted):
    ranking, sets = planted
    table = enrich.prerank(ranking, sets, EnrichSettings(min_size=31, max_size=500)).table
    assert table.empty and list(table.columns) == enrich.PRERANK_COLUMNS
    small = EnrichSettings(min_size=31, library_min_size={"toy": 5})
    assert len(enrich.prerank(ranking, sets, small).table) == 21


def test_a_largely_tied_ranking_is_refused(planted):
    """gseapy's prerank crashed on a ranking with 56% ties ("comparison function does not
    correctly implement a total order"); such a ranking is refused with the reason."""
    ranking, sets = planted
    tied = ranking.copy()
    tied.iloc[600:1440] = 0.0
    assert enrich.tied_fraction(tied) == pytest.approx(0.56)
    with pytest.raises(UserError, match="56% of the ranked genes share their score"):
        enrich.prerank(tied, sets, EnrichSettings(min_size=10))
    assert enrich.check_ties(ranking, 0.05) == ""


def test_ora_finds_the_planted_list(planted):
    _, sets = planted
    chosen = GENES[:25] + GENES[800:820]
    table = enrich.ora(chosen, GENES, sets, EnrichSettings(min_size=10))
    assert list(table.columns) == enrich.ORA_COLUMNS
    top = table.iloc[0]
    assert top["Term"] == "planted" and top["Overlap"] == "25/30"
    # one-sided hypergeometric: 25 or more of 30 set genes among 45 chosen of 1,500
    assert top["P-value"] == pytest.approx(hypergeom.sf(24, len(GENES), 30, len(chosen)), rel=1e-6)
    assert top["Adjusted P-value"] < 1e-20
    assert (table.loc[table["Term"] != "planted", "Adjusted P-value"] > 0.01).all()


def test_ora_fdr_counts_sets_without_overlap():
    chosen = GENES[:20]
    sets = {
        "lib": {
            "hit": GENES[:20],
            **{f"far{i}": GENES[100 + 20 * i : 120 + 20 * i] for i in range(49)},
        }
    }
    table = enrich.ora(chosen, GENES, sets, EnrichSettings(min_size=10))
    assert table["Term"].tolist() == ["hit"]  # only overlapping sets are listed
    p = hypergeom.sf(19, len(GENES), 20, 20)
    assert table.loc[0, "Adjusted P-value"] == pytest.approx(p * 50, rel=1e-6)  # BH, m = 50


def test_ora_needs_genes_in_the_background():
    with pytest.raises(UserError, match="background"):
        enrich.ora(["NOPE"], GENES, {"toy": {"a": GENES[:20]}}, EnrichSettings())


def test_ad_rows_pick_ad_terms_and_curated_libraries():
    table = pd.DataFrame(
        {
            "library": ["KEGG", "GO", "GO", "GO", "WP", "KEGG", "GO", "alzheimers_curated"],
            "Term": [
                "Alzheimer disease",
                "Amyloid-Beta Formation (GO:0034205)",
                "Regulation Of Tau-Protein Kinase Activity (GO:1902947)",
                "Microglial Cell Activation (GO:0001774)",
                "TYROBP causal network in microglia",
                "Ribosome",
                "Tautomerase Activity",
                "AD_CORE_GENES",
            ],
        }
    )
    kept = enrich.ad_rows(table)["Term"].tolist()
    assert kept == table["Term"].drop([5, 6]).tolist()


def test_settings_are_validated():
    with pytest.raises(UserError, match="multilevel or permutation"):
        EnrichSettings(method="fast")
    with pytest.raises(UserError, match="min_size <= max_size"):
        EnrichSettings(min_size=50, max_size=20)
    with pytest.raises(UserError, match="max_tied must be in"):
        EnrichSettings(max_tied=1.0)


def _gene_table(candidates):
    rows = [
        pd.DataFrame(
            {
                "candidate": name,
                "confirmed": confirmed,
                "stratum_type": "all",
                "stratum": "all",
                "gene": GENES,
                "z": scores,
            }
        )  # fmt: skip
        for name, confirmed, scores in candidates
    ]
    return pd.concat(rows, ignore_index=True)


def test_enrich_candidates_writes_tables_per_candidate(tmp_path, planted):
    ranking, sets = planted
    sets = {**sets, "alzheimers_curated": {"AD_TOY": GENES[5:12]}}
    tied = ranking.to_numpy().copy()
    tied[:1000] = 1.0
    reverse = ranking[::-1].to_numpy()
    genes = _gene_table(
        [
            ("L1[5,3]", True, ranking.to_numpy()),
            ("L0[1,2]", False, reverse),
            ("L3[0,0]", False, tied),
        ]
    )
    nulls = _null_table("L3[0,0]", "random", 2)
    summary = enrich.enrich_candidates(genes, sets, toy_settings(), tmp_path, null_genes=nulls)
    assert list(summary.columns) == enrich.SUMMARY_COLUMNS
    assert summary.loc[2, "null_reason"] == "the candidate's ranking was not tested"
    assert summary.loc[2, "n_null_rankings"] == 0 and np.isnan(summary.loc[2, "ad_test_p_null"])
    assert summary["folder"].tolist() == ["L1_5_3", "L0_1_2", "L3_0_0"]
    assert summary.loc[0, "top_term"] == "planted" and summary.loc[0, "top_ad_term"] == "AD_TOY"
    assert summary["status"].tolist() == ["confirmed", enrich.EXPLORATORY, enrich.EXPLORATORY]
    assert summary.loc[0, "n_tests"] == 2 * 22 and (summary["n_tests_total"] == 4 * 22).all()
    assert "67% of the ranked genes" in summary.loc[2, "reason"]
    assert not (tmp_path / "L3_0_0").exists()
    for folder in ("L1_5_3", "L0_1_2"):
        for name in (*enrich.OUTPUT_FILES, "gsea_curves.json"):
            assert (tmp_path / folder / name).is_file()
    ad = pd.read_csv(tmp_path / "L1_5_3" / "ad_terms.tsv", sep="\t")
    assert set(ad["analysis"]) == {"prerank", "ora"} and set(ad["Term"]) == {"AD_TOY"}
    for name in enrich.OUTPUT_FILES:
        table = pd.read_csv(tmp_path / "L0_1_2" / name, sep="\t")
        assert table.columns[0] == "status" and set(table["status"]) == {enrich.EXPLORATORY}
    assert "status" not in pd.read_csv(tmp_path / "L1_5_3" / "prerank.tsv", sep="\t")
    assert (tmp_path / "summary.tsv").is_file()
    assert not list(tmp_path.rglob(".*.partial*"))


def test_cell_level_rankings_are_enriched_beside_the_token_ones(tmp_path, planted):
    """Only candidates of the gene table (the mapped ones) get a cell-level enrichment."""
    ranking, sets = planted
    genes = _gene_table([("L1[5,3]", True, ranking[::-1].to_numpy())])
    association = pd.DataFrame(
        {"candidate": ["L1[5,3]"] * len(ranking) + ["L9[0,0]"] * len(ranking),
         "gene": [*ranking.index, *ranking.index], "z": [*ranking, *ranking]}
    )  # fmt: skip
    summary = enrich.enrich_candidates(genes, sets, toy_settings(), tmp_path, association)
    assert summary["ranking"].tolist() == ["token", "cell"]
    assert summary["folder"].tolist() == ["L1_5_3", "L1_5_3_cell"]
    # planted is at the bottom of the token ranking: depleted there, never its top term
    assert summary.loc[1, "top_term"] == "planted" and summary.loc[0, "top_term"] != "planted"
    assert (summary["top_NES"] > 0).all()
    assert summary.loc[1, "n_enriched"] >= 1 and summary.loc[0, "n_depleted"] >= 1
    assert (summary["n_tests_total"] == summary["n_tests"].sum()).all()
    assert (tmp_path / "L1_5_3_cell" / "prerank.tsv").is_file()
    assert not list(tmp_path.glob("L9*"))


# --- plots ------------------------------------------------------------------------------


def test_plots_are_gseapys_and_exploratory_ones_say_so(tmp_path, planted, monkeypatch):
    ranking, sets = planted
    sets = {**sets, "alzheimers_curated": {"AD_TOY": GENES[5:12]}}
    genes = _gene_table([("L1[5,3]", True, ranking.to_numpy()),
                         ("L0[1,2]", False, ranking[::-1].to_numpy())])  # fmt: skip
    enrich.enrich_candidates(genes, sets, toy_settings(min_size=5), tmp_path)
    titles = []
    for name in ("dotplot", "gseaplot"):
        original = getattr(gseapy, name)

        def spy(*args, _original=original, **kwargs):
            titles.append(kwargs.get("title") or kwargs.get("term"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(gseapy, name, spy)
    paths = plot_candidates(tmp_path, n_terms=2)
    names = sorted(p.name for p in paths if p.parent.name == "L1_5_3")
    assert names == ["dotplot.png", "gsea_ad1.png", "gsea_top1.png", "gsea_top2.png"]
    for path in paths:
        assert path.read_bytes()[:4] == b"\x89PNG"
    exploratory = [t for t in titles if "L0[1,2]" in t or t.startswith("EXPLORATORY")]
    assert len(exploratory) == 4 and len(titles) == 8
    assert not any("EXPLORATORY" in t or enrich.EXPLORATORY in t for t in titles[:4])


def test_a_candidate_without_tested_sets_gets_no_dotplot(tmp_path, planted):
    ranking, sets = planted
    genes = _gene_table([("L1[5,3]", True, ranking.to_numpy())])
    enrich.enrich_candidates(genes, sets, toy_settings(min_size=400), tmp_path)
    assert plot_candidate(tmp_path / "L1_5_3", "L1[5,3]") == []


# --- calibrated enrichment --------------------------------------------------------------

AD_GENES = GENES[700:720]


def _ad_ranking(seed: int, where: str) -> pd.Series:
    """Standard normal scores; the 20 AD genes' shifted by +2 sd ("top"), -2 sd ("bottom")
    or not ("random")."""
    scores = pd.Series(np.random.default_rng(seed).normal(size=len(GENES)), index=GENES)
    shift = {"top": 2.0, "bottom": -2.0, "random": 0.0}[where]
    scores[AD_GENES] += shift
    return scores


@pytest.fixture(scope="module")
def ad_sets(planted):
    _, sets = planted
    return {**sets, "alzheimers_curated": {"AD_TOY": AD_GENES}}


def ad_settings(**kwargs):
    return toy_settings(**{"ad_test_sets": ("alzheimers_curated",), **kwargs})


@pytest.mark.parametrize(("method", "reference"), [("bh", "fdr_bh"), ("by", "fdr_by")])
def test_q_all_tests_is_over_every_test_of_the_ranking(planted, method, reference):
    """One family per ranking: prerank and ORA of every set of every library, ORA sets
    without overlap counted with p = 1; checked against statsmodels."""
    ranking, sets = planted
    rng = np.random.default_rng(1)
    second = {f"other{i}": list(rng.choice(GENES, 25, replace=False)) for i in range(10)}
    libraries = {**sets, "second": second}
    settings = toy_settings(fdr_method=method)
    tables, _ = enrich.enrich_ranking(ranking, libraries, settings)
    m = enrich.n_tests(ranking, libraries, settings)
    assert m == 2 * (21 + 10)
    pre, over = tables["prerank.tsv"], tables["ora.tsv"]
    assert len(over) < 31  # some ORA sets have no overlap: unlisted, yet in the family
    p = np.concatenate([pre["NOM p-val"], over["P-value"]])
    expected = multipletests(np.concatenate([p, np.ones(m - len(p))]), method=reference)[1]
    got = np.concatenate([pre["q_all_tests"], over["q_all_tests"]])
    np.testing.assert_allclose(got, expected[: len(p)], rtol=1e-9)
    for table in (pre, over):
        significant = table["q_all_tests"] <= settings.fdr_threshold
        assert (table.loc[significant, "call"] == table.loc[significant, "direction"]).all()
        assert (table.loc[~significant, "call"] == enrich.NOT_SIGNIFICANT).all()
    assert set(over["direction"]) == {enrich.ENRICHED}
    assert (pre["direction"] == np.where(pre["NES"] > 0, "enriched", "depleted")).all()


def test_ad_genes_at_the_top_are_enriched_with_a_small_competitive_p(ad_sets):
    ranking = _ad_ranking(3, "top")
    tables, _ = enrich.enrich_ranking(ranking, ad_sets, ad_settings())
    row = tables["prerank.tsv"].set_index("Term").loc["AD_TOY"]
    assert row["NES"] > 0 and row["call"] == "enriched" and row["q_all_tests"] < 0.01
    found = enrich.hits(tables)
    assert found["ad_hit"] and found["top_ad_term"] == "AD_TOY" and found["n_ad_enriched"] == 1
    test = enrich.ad_test(ranking, AD_GENES)
    assert test["ad_test_n_genes"] == 20 and test["ad_test_auc"] > 0.85
    assert test["ad_test_p"] < 1e-6


def test_ad_genes_at_the_bottom_are_depleted_never_a_hit(ad_sets):
    ranking = _ad_ranking(3, "bottom")
    tables, _ = enrich.enrich_ranking(ranking, ad_sets, ad_settings())
    row = tables["prerank.tsv"].set_index("Term").loc["AD_TOY"]
    assert row["NES"] < 0 and row["q_all_tests"] < 0.01 and row["call"] == "depleted"
    found = enrich.hits(tables)
    assert not found["ad_hit"] and found["n_ad_enriched"] == 0 and found["n_depleted"] >= 1
    assert "AD_TOY" not in set(tables["ora.tsv"]["Term"])  # none of them among the top genes
    assert enrich.ad_test(ranking, [g.lower() for g in AD_GENES])["ad_test_p"] > 0.9999


def test_competitive_p_is_uniform_on_random_rankings():
    """Under the null the test is built for (exchangeable gene scores) p is uniform: KS
    test, and the count at p <= 0.05 of 1,000 rankings is Binomial(1000, 0.05), kept within
    its 0.1% and 99.9% quantiles."""
    rng = np.random.default_rng(11)
    p = np.array(
        [enrich.ad_test(pd.Series(rng.normal(size=600), index=GENES[:600]), GENES[:40])["ad_test_p"]
         for _ in range(1000)]
    )  # fmt: skip
    assert kstest(p, "uniform").pvalue > 0.001
    low, high = binom.ppf([0.001, 0.999], 1000, 0.05)
    assert low <= (p <= 0.05).sum() <= high


def _null_table(candidate: str, where: str, n: int, seed: int = 20) -> pd.DataFrame:
    rows = []
    for j in range(1, n + 1):
        ranking = _ad_ranking(seed + j, where)
        rows.append(pd.DataFrame({"candidate": candidate, "confirmed": True, "null": j,
                                  "null_row": j, "null_col": 2 * j, "gene": ranking.index,
                                  "n_cells": 10, "z": ranking.to_numpy()}))  # fmt: skip
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("seed", range(3))
def test_permutation_p_values_are_never_zero(seed):
    """gseapy's permutation method reports p = 0 when no permutation reaches the ES; BH made
    that q = 0 and random rankings had 'enriched' sets. Floored at 1 / (permutations + 1)."""
    ranking = _ad_ranking(seed, "random")
    sets = {"toy": {f"s{i}": GENES[30 * i : 30 * i + 30] for i in range(40)}}
    settings = toy_settings(method="permutation", permutation_num=20, ad_test_sets=("toy",))
    tables, _ = enrich.enrich_ranking(ranking, sets, settings)
    assert tables["prerank.tsv"]["NOM p-val"].min() == pytest.approx(1 / 21)
    assert enrich.hits(tables)["n_enriched"] == 0


def test_null_weight_rankings_give_the_expected_rate_of_ad_hits(tmp_path, ad_sets):
    """Null-weight rankings with nothing planted: under this global null BH's chance of any
    call is at most 0.05, so the AD hits of 20 nulls are at most Binomial(20, 0.05) (kept
    below its 99.9% quantile, 4); the candidate, AD genes on top, beats every null."""
    genes = _gene_table([("L1[5,3]", True, _ad_ranking(3, "top").reindex(GENES).to_numpy())])
    nulls = _null_table("L1[5,3]", "random", 20)
    summary = enrich.enrich_candidates(genes, ad_sets, ad_settings(), tmp_path, null_genes=nulls)
    row = summary.iloc[0]
    assert row["ad_hit"] and row["n_null_rankings"] == 20 and row["null_reason"] == ""
    limit = binom.ppf(0.999, 20, 0.05) / 20
    assert row["null_ad_hit_rate"] <= limit and row["null_any_hit_rate"] <= limit
    assert row["null_ad_test_rate"] <= limit
    assert row["ad_test_p_null"] == pytest.approx(1 / 21)
    table = pd.read_csv(tmp_path / "null_rankings.tsv", sep="\t")
    assert list(table.columns) == enrich.NULL_RANKING_COLUMNS
    assert table["weight"].tolist() == ["candidate"] + ["null weight"] * 20
    assert table["null"].iloc[1:].tolist() == list(range(1, 21)) and table["null"].isna()[0]
    assert "\tnull weight\t1\t1\t2\t" in (tmp_path / "null_rankings.tsv").read_text()
    assert table["null_col"].iloc[1:].tolist() == list(range(2, 42, 2))
    assert (table["n_tests"] == 2 * 22).all()
    assert row["null_ad_hit_rate"] == table["ad_hit"].iloc[1:].mean()


def test_null_rankings_that_hit_ad_sets_are_counted(tmp_path, ad_sets):
    """Null weights whose rankings put the AD genes on top hit every time, and the
    candidate, no better, is not singled out; the cell ranking has no null rankings."""
    genes = _gene_table([("L1[5,3]", True, _ad_ranking(3, "top").reindex(GENES).to_numpy())])
    association = pd.DataFrame({"candidate": "L1[5,3]", "gene": GENES,
                                "z": _ad_ranking(4, "random").reindex(GENES)})  # fmt: skip
    nulls = _null_table("L1[5,3]", "top", 5)
    settings = ad_settings(n_null_rankings=5)
    summary = enrich.enrich_candidates(genes, ad_sets, settings, tmp_path, association, nulls)
    token, cell = summary.iloc[0], summary.iloc[1]
    assert token["null_ad_hit_rate"] == 1 and token["null_ad_test_rate"] == 1
    assert token["ad_test_p_null"] > 0.15
    assert cell["n_null_rankings"] == 0 and np.isnan(cell["null_ad_hit_rate"])
    assert "no null-weight rankings" in cell["null_reason"]
    assert cell["ad_test_n_genes"] == 20 and 0 < cell["ad_test_p"] < 1


def _causal_table(candidate: str, confirmed: bool, ranking: pd.Series) -> pd.DataFrame:
    """gene_effects' genes_causal.tsv for one candidate: the ranking as `path_z`; `act_z`
    reversed, so that ranking by it would show."""
    return pd.DataFrame({"candidate": candidate, "confirmed": confirmed, "gene": ranking.index,
                         "n_cells": 10, "path_z": ranking.to_numpy(),
                         "act_z": -ranking.to_numpy()})  # fmt: skip


def _null_causal_table(candidate: str, where: str, n: int, seed: int = 40) -> pd.DataFrame:
    """null_gene_effects.tsv: the null weights' rankings as `path_z` (no `z` column)."""
    table = _null_table(candidate, where, n, seed)
    return table.rename(columns={"z": "path_z"}).assign(act_z=0.0)


def test_the_causal_ranking_is_enriched_first_as_the_primary_one(tmp_path, ad_sets):
    """Causal (path_z, nulls from null_gene_effects.tsv), then token (z, nulls from
    null_genes.tsv), then cell; each with its own null rankings, every test counted."""
    causal = _causal_table("L1[5,3]", True, _ad_ranking(3, "top"))
    null_causal = _null_causal_table("L1[5,3]", "random", 4)
    genes = _gene_table([("L1[5,3]", True, _ad_ranking(5, "random").reindex(GENES).to_numpy())])
    null_genes = _null_table("L1[5,3]", "random", 3)
    association = pd.DataFrame({"candidate": "L1[5,3]", "gene": GENES,
                                "z": _ad_ranking(4, "random").reindex(GENES)})  # fmt: skip
    summary = enrich.enrich_candidates(genes, ad_sets, ad_settings(n_null_rankings=4), tmp_path,
                                       association, null_genes, causal, null_causal)  # fmt: skip
    assert summary["ranking"].tolist() == ["causal", "token", "cell"]
    assert summary["role"].tolist() == [enrich.RANKING_ROLES[k] for k in enrich.RANKINGS]
    assert summary.loc[0, "role"] == "primary"
    assert summary["folder"].tolist() == ["L1_5_3_causal", "L1_5_3", "L1_5_3_cell"]
    causal_row, token_row = summary.iloc[0], summary.iloc[1]
    assert causal_row["ad_hit"] and causal_row["top_ad_term"] == "AD_TOY"  # path_z, not act_z
    assert causal_row["ad_test_p"] < 1e-6 and causal_row["ad_test_p_null"] == pytest.approx(1 / 5)
    assert causal_row["n_null_rankings"] == 4 and token_row["n_null_rankings"] == 3
    assert summary.loc[2, "n_null_rankings"] == 0
    assert (summary["n_tests"] == 2 * 22).all()
    assert (summary["n_tests_total"] == 3 * 2 * 22).all()
    table = pd.read_csv(tmp_path / "null_rankings.tsv", sep="\t")
    assert table["ranking"].tolist() == ["causal"] * 5 + ["token"] * 4 + ["cell"]
    # the causal null rankings are null_gene_effects' path_z, each its own ranking
    expected = enrich.ad_test(_ad_ranking(41, "random"), AD_GENES)["ad_test_p"]
    assert table.loc[1, "ad_test_p"] == pytest.approx(expected)
    for folder in ("L1_5_3_causal", "L1_5_3", "L1_5_3_cell"):
        assert (tmp_path / folder / "prerank.tsv").is_file()


def test_the_starting_models_causal_ranking_is_enriched_by_its_expr_z(tmp_path, ad_sets):
    """gene_effects_base's tables rank by `expr_z` (masked-expression effects): enriched alone,
    against its null weights' expr_z rankings; a table with both statistics is refused."""
    base = _causal_table("L0[2,9]", True, _ad_ranking(3, "top")).rename(
        columns={"path_z": "expr_z", "act_z": "expr_effect"}
    )
    nulls = _null_causal_table("L0[2,9]", "random", 3).drop(columns="act_z")
    nulls = nulls.rename(columns={"path_z": "expr_z"})
    summary = enrich.enrich_candidates(None, ad_sets, ad_settings(n_null_rankings=3), tmp_path,
                                       causal=base, null_causal=nulls)  # fmt: skip
    assert summary["ranking"].tolist() == ["causal"]
    row = summary.iloc[0]
    assert row["ad_hit"] and row["top_ad_term"] == "AD_TOY" and row["n_null_rankings"] == 3
    expected = enrich.ad_test(_ad_ranking(41, "random"), AD_GENES)["ad_test_p"]
    table = pd.read_csv(tmp_path / "null_rankings.tsv", sep="\t")
    assert table.loc[1, "ad_test_p"] == pytest.approx(expected)
    with pytest.raises(UserError, match="exactly one of the columns"):
        enrich.ranking_from_causal(base.assign(path_z=0.0), "L0[2,9]")


def test_a_candidate_without_causally_ranked_genes_keeps_its_other_rankings(tmp_path, ad_sets):
    """An empty causal ranking is a row with its reason; a candidate only in the causal
    table gets only its causal ranking."""
    causal = pd.concat([_causal_table("L1[5,3]", True, _ad_ranking(3, "top")).iloc[:0],
                        _causal_table("L2[0,1]", False, _ad_ranking(6, "random"))])  # fmt: skip
    genes = _gene_table([("L1[5,3]", True, _ad_ranking(5, "random").reindex(GENES).to_numpy())])
    settings = ad_settings(n_null_rankings=2)
    null_causal = _null_causal_table("L2[0,1]", "random", 2)
    summary = enrich.enrich_candidates(genes, ad_sets, settings, tmp_path, causal=causal,
                                       null_causal=null_causal)  # fmt: skip
    assert summary[["candidate", "ranking"]].values.tolist() == [
        ["L2[0,1]", "causal"], ["L1[5,3]", "causal"], ["L1[5,3]", "token"]
    ]  # fmt: skip
    assert summary.loc[0, "status"] == enrich.EXPLORATORY
    assert summary.loc[0, "n_null_rankings"] == 2
    empty = summary.iloc[1]
    assert empty["n_tests"] == 0 and "no gene is ranked" in empty["reason"]
    assert empty["null_reason"] == "the candidate's ranking was not tested"
    assert not (tmp_path / "L1_5_3_causal").exists()
    assert (summary["n_tests_total"] == 2 * 2 * 22).all()


def test_fewer_null_rankings_than_asked_are_used_and_counted(tmp_path, ad_sets, caplog):
    genes = _gene_table([("L1[5,3]", True, _ad_ranking(3, "random").reindex(GENES).to_numpy())])
    nulls = _null_table("L1[5,3]", "random", 3)
    summary = enrich.enrich_candidates(genes, ad_sets, ad_settings(n_null_rankings=4), tmp_path,
                                       null_genes=nulls)  # fmt: skip
    assert summary.loc[0, "n_null_rankings"] == 3 and "fewer than n_null_rankings" in caplog.text


def test_ad_test_sets_must_be_loaded(ad_sets):
    assert enrich.ad_test_genes(ad_sets, ["toy:planted", "alzheimers_curated"]) == [
        *GENES[:30], *AD_GENES
    ]  # fmt: skip
    with pytest.raises(UserError, match="no gene-set library 'nope' is loaded"):
        enrich.ad_test_genes(ad_sets, ["nope"])
    with pytest.raises(UserError, match="toy has no set 'AD'"):
        enrich.ad_test_genes(ad_sets, ["toy:AD"])


def test_causal_scores_become_centred_ranks():
    z = pd.Series([5.0, np.nan, -1.0, 2e6, 5.0], index=list("abcde"))
    ranks = enrich.centred_ranks(z)
    assert ranks.drop("b").tolist() == [0.0, -0.375, 0.375, 0.0]  # (rank - 2.5) / 4
    assert np.isnan(ranks["b"])
    table = pd.DataFrame({"candidate": "c", "gene": list("abcde"), "path_z": z.to_numpy()})
    assert enrich.ranking_from_causal(table, "c").equals(ranks)


def test_one_enormous_causal_z_does_not_decide_the_enrichment():
    """A set with 9 of its 16 genes at the top of 341 is enriched. Scored by raw z (the values
    of the demo's control: tiny null sds give z up to 2e6), the running sum steps by |z|: a
    random set holding the top gene reaches a larger ES than the set itself, whose other
    genes include one of z -10.75, and the set's p is that of holding the top gene (about
    16/341)."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(341)]
    z = pd.Series(rng.normal(scale=0.4, size=341), index=genes)
    z.iloc[:9] = [2.19e6, 3.0e5, 3.8e4, 3.6e4, 2.6e4, 1.6e4, 5.6e3, 2.7e3, 1.9e3]
    z.iloc[-1] = -10.75
    planted = genes[:9] + [genes[-1]] + list(rng.choice(genes[9:-1], 6, replace=False))
    sets = {"planted": planted}
    for i in range(20):
        sets[f"random{i}"] = list(rng.choice(genes, 16, replace=False))
    settings = toy_settings(min_size=15)
    table = pd.DataFrame({"candidate": "c", "gene": genes, "path_z": z.to_numpy()})

    def p_of(ranking):
        result = enrich.prerank(ranking, {"toy": sets}, settings).table.set_index("Term")
        return result.loc["planted", "NOM p-val"]

    assert p_of(enrich.ranking_from_causal(table, "c")) < 1e-4
    assert p_of(z) > 0.01


def test_null_gene_table_needs_its_columns():
    with pytest.raises(UserError, match=r"lacks column\(s\) \['null'\]"):
        enrich.null_rankings(pd.DataFrame(columns=["candidate", "gene", "z"]), "L1[5,3]", 5)
    with pytest.raises(UserError, match=r"lacks column\(s\) \['path_z'\]"):
        enrich.null_rankings(pd.DataFrame(columns=["candidate", "null", "gene", "z"]),
                             "L1[5,3]", 5, "path_z")  # fmt: skip
    with pytest.raises(UserError, match=r"exactly one of the columns \['path_z', 'expr_z'\]"):
        enrich.ranking_from_causal(pd.DataFrame(columns=["candidate", "gene"]), "L1[5,3]")
    with pytest.raises(UserError, match=r"causal gene table lacks column\(s\) \['gene'\]"):
        enrich.ranking_from_causal(pd.DataFrame(columns=["candidate", "path_z"]), "L1[5,3]")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"fdr_method": "holm"}, "bh or by"), ({"n_null_rankings": -1}, "n_null_rankings"),
     ({"ad_test_level": 1.0}, "ad_test_level"), ({"ad_test_sets": ()}, "ad_test_sets")],
)  # fmt: skip
def test_calibration_settings_are_validated(change, message):
    with pytest.raises(UserError, match=message):
        EnrichSettings(**change)
