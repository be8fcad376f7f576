"""Gene-set libraries, GMT validation, prerank/ORA on planted data, AD rows and plots."""

import socket

import blitzgsea.enrichr
import gseapy
import numpy as np
import pandas as pd
import pytest
import requests
from scipy.stats import hypergeom

from superweights import enrich
from superweights.enrich import EnrichSettings, GeneSetSettings, read_gmt
from superweights.enrich_plots import plot_candidate, plot_candidates
from superweights.errors import UserError

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
    curated = read_gmt(enrich.RESOURCE_DIR / "alzheimers_curated.gmt")
    assert curated["AD_CORE_GENES"] == ["APP", "MAPT", "APOE", "TREM2", "PSEN1", "PSEN2"]
    assert "TYROBP" in curated["DAM_MICROGLIA_UP_KEREN_SHAUL_2017"]
    gwas = read_gmt(enrich.RESOURCE_DIR / "bellenguez2022_gwas.gmt")
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
    settings = EnrichSettings(min_size=10, permutation_num=100, ora_top_n=30)
    summary = enrich.enrich_candidates(genes, sets, settings, tmp_path)
    assert list(summary.columns) == enrich.SUMMARY_COLUMNS
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
    settings = EnrichSettings(min_size=10, permutation_num=100, ora_top_n=30)
    summary = enrich.enrich_candidates(genes, sets, settings, tmp_path, association)
    assert summary["ranking"].tolist() == ["token", "cell"]
    assert summary["folder"].tolist() == ["L1_5_3", "L1_5_3_cell"]
    assert (summary["top_term"] == "planted").all()  # at the bottom of the token ranking
    assert summary.loc[1, "top_NES"] > 0 > summary.loc[0, "top_NES"]
    assert (summary["n_tests_total"] == summary["n_tests"].sum()).all()
    assert (tmp_path / "L1_5_3_cell" / "prerank.tsv").is_file()
    assert not list(tmp_path.glob("L9*"))


# --- plots ------------------------------------------------------------------------------


def test_plots_are_gseapys_and_exploratory_ones_say_so(tmp_path, planted, monkeypatch):
    ranking, sets = planted
    sets = {**sets, "alzheimers_curated": {"AD_TOY": GENES[5:12]}}
    genes = _gene_table([("L1[5,3]", True, ranking.to_numpy()),
                         ("L0[1,2]", False, ranking[::-1].to_numpy())])  # fmt: skip
    enrich.enrich_candidates(genes, sets, EnrichSettings(min_size=5, permutation_num=100), tmp_path)
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
    enrich.enrich_candidates(genes, sets, EnrichSettings(min_size=400), tmp_path)
    assert plot_candidate(tmp_path / "L1_5_3", "L1[5,3]") == []
