"""The HTML report: sections, statements, tables, embedded figures, missing inputs, browser."""

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from docutils.core import publish_parts  # noqa: E402

from helpers import (  # noqa: E402
    CHROMIUM,
    CONFIG,
    CONTROL_SCORE,
    DATASET,
    FIGURES,
    ROOT,
    chromium,
    page_errors,
    write_results,
)
from superweights.captions import CAPTIONS  # noqa: E402
from superweights.errors import UserError  # noqa: E402
from superweights.report import (  # noqa: E402
    INPUT_FILES,
    OPTIONAL_INPUTS,
    REQUIRED,
    build_report,
    fmt,
    make_table,
)

SECTIONS = ("summary", "data", "probe", "pruning", "cells", "genes", "pathways", "quantization",
            "control", "methods")  # fmt: skip
RULES = ROOT / "workflow" / "rules"
SHOWN_BY_SNAKEMAKE = re.compile(r'report\(\s*"results/\{dataset\}/([^"]+)",\s*caption="([^"]+)"')


@pytest.fixture(scope="module")
def png() -> bytes:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60)
    plt.close(fig)
    return buffer.getvalue()


@pytest.fixture
def results(tmp_path, png, monkeypatch) -> Path:
    """The results folder, relative to the working directory as in a Snakemake run."""
    monkeypatch.chdir(tmp_path)
    write_results(Path("results"), png)
    return Path("results")


def build(results: Path, config: dict = CONFIG) -> str:
    out = build_report(results / DATASET, DATASET, config, results.parent / "report" / "demo.html")
    return out.read_text()


def section(page: str, name: str) -> str:
    """The HTML of one <section> (up to the next one)."""
    start = page.index(f'<section id="{name}">')
    return page[start : page.index("</section>", start)]


def test_every_section_has_an_id_a_heading_and_a_toc_entry(results):
    page = build(results)
    for name in SECTIONS:
        assert re.search(rf'<section id="{name}">\s*<h2>', page), name
        assert f'href="#{name}"' in page
    assert "(not set)" not in page  # every config key the Methods use exists in config.yaml


def test_summary_states_what_was_found_from_the_outputs(results):
    text = html.unescape(section(build(results), "summary"))
    assert "1 super weight: layer 1, W[12, 40]." in text
    assert (
        "The probe accepted 1 candidate (massive activations); pruning confirmed 1 of the 2 "
        "tested weights, 1 with the super-weight mechanism" in text
    )
    assert "(transformer_encoder.layers.1.linear2), super weight: pruning" in text
    assert "lowers the mean log-likelihood of the true cell type by 3.89" in text
    assert "p = 0.01, q = 0.02 against weights whose largest term |x·w| is as large" in text
    assert "restoring its activation recovers 80% of the drop" in text
    assert "accuracy 0.912 and macro F1 0.877" in text
    assert "demo (demo): 849 cells of 3 cell types from 10 donors after QC, 1,201 genes" in text
    assert "APOE ranks 3 of 30 on L1[12,40]" in text
    assert "MAPT" not in text.split("Genes of interest in the top 10%")[1].split("</dd>")[0]
    assert (
        "L1[12,40] (token-level): 4 gene sets of 120 enriched and 2 depleted at q ≤ 0.05 (top: "
        "astrocyte "
        "differentiation (GO:0048708), NES 2.35), 1 AD-related set enriched; pre-specified AD "
        "test (AD genes vs the rest, one-sided Mann-Whitney): AUC 0.71, p = 0.004; of 20 null "
        "weights' rankings, 5% hit an AD set and 10% reach AD test p ≤ 0.05" in text
    )
    assert "240 tests in all (prerank and ORA, across 1 ranking and every library" in text
    assert "naive 0.85 → 0.41; clip only 0.6 → 0.6; clip + restore SW 0.87 → 0.87" in text


def test_no_super_weight_is_stated_plainly(tmp_path, png):
    write_results(tmp_path / "results", png, accepted=False)
    page = html.unescape(build(tmp_path / "results"))
    summary = section(page, "summary")
    assert "No super weight: no tested weight was confirmed by pruning." in summary
    assert (
        "No spike passed the probe's thresholds; the 2 strongest spikes were tested by "
        "pruning and none lowered the cell-type log-likelihood beyond its null and the top-k "
        "control." in summary
    )
    assert "No super weight was held out, so clip + restore equals clip only" in summary
    assert 'class="headline none"' in page
    assert "L1[12,40] (token-level) (exploratory: not confirmed by pruning): 4 gene sets" in summary


def test_sections_show_the_stage_outputs(results):
    page = html.unescape(build(results))
    data = section(page, "data")
    for value in ("0.912", "0.877", "-0.312", "Astrocyte", "cell types dropped (too few cells)",
                  "VLMC", "results/demo/pretrain"):  # fmt: skip
        assert value in data
    assert "<pre>" in data and "input_ratio: 10.0" in data  # the config as YAML
    probe = section(page, "probe")
    assert "PROBE STATEMENT X" in probe and "512" in probe
    assert "transformer_encoder.layers.1.norm2" in probe  # LayerNorm outliers
    assert "<strong>layer 2, W[3, 5]</strong>: spikes on different tokens" in probe
    pruning = section(page, "pruning")
    assert "super weight: REASON ONE" in pruning and "EXPRESSION NOTE" in pruning
    assert "<strong>L2[3,5] (probe: accepted)</strong>: rejected: drop 0.01" in pruning
    assert "too few donors (2 &lt; 3)" in pruning or "too few donors (2 < 3)" in pruning
    assert (
        "AD strata compared by donor (mean of donor means, t interval, smallest effect "
        "detectable with 80% power): Low (L1[12,40]): 2.9 [2.2, 3.5] over 6 donors, smallest "
        "detectable 0.9. Listed, not compared (too few donors): High. Trend across Overall AD "
        "neuropathological Change (L1[12,40]): Spearman rho 0.41 over 8 donors in 2 stages, "
        "permutation p 0.31; smallest detectable |rho| 0.83." in pruning
    )
    assert "q (BH)" in pruning and "top-k drop" in pruning
    assert (
        "Of 2 weights confirmed in the starting model and tested in the fine-tuned one, 1 "
        "remain confirmed after fine-tuning; 0 appear only in the fine-tuned model; 2 weights "
        "tested in all. The probe found the same massive activation in both models for 1."
        in pruning
    )
    pathways = section(page, "pathways")
    assert "astrocyte differentiation (GO:0048708)" in pathways
    assert "ORA TERM amyloid clearance" in pathways and "Alzheimer disease" in pathways
    assert "Starting model: causal ranking" in pathways and "base model top term" in pathways
    quantization = section(page, "quantization")
    assert CAPTIONS["quantize_figure"] in quantization
    assert "1024×1024 (27.55 → 45.40)" in quantization  # the paper's finding ...
    assert (  # ... and ours, in its terms
        "Here, INT4 accuracy from blocks of 64 to one block per matrix (unquantized 0.91): "
        "naive 0.85 → 0.41; clip only 0.6 → 0.6; clip + restore SW 0.87 → 0.87 (clip "
        "thresholds chosen on validation cells). As in the paper, restoring the super weights "
        "after clipping helps at the largest block: +0.5 nats of log p(true type) per cell over "
        "clipping alone (95% CI +0.31 to +0.72, over 4 donors); not detectably beyond restoring "
        "the largest other weight of the same matrix (+0.45, CI -0.02 to +0.9). W8A8 (tensor "
        "activation scales): accuracy 0.9 naive, 0.905 with the super activation held out."
        in quantization
    )
    assert "Differences between arms on the test cells" in quantization
    assert "accuracy: clip + restore SW" in quantization and "threshold: clip only" in quantization
    methods = " ".join(section(page, "methods").split())
    assert "at least 100 times the layer median" in methods
    assert "q ≤ 0.05, the effect is at least 0.01 nats per cell" in methods


def test_genes_of_interest_are_highlighted(results):
    genes = section(build(results), "genes")
    for gene in ("APP", "MAPT", "TREM2", "APOE", "PSEN1", "PSEN2"):
        assert f'<td><strong class="goi">{gene}</strong></td>' in genes
    top = genes.split("top 20 genes per candidate")[1]
    assert re.search(r'<tr class="goi"><td class="num">3</td><td><strong class="goi">APOE', top)
    assert "<td>GFAP</td>" in top and "<td>GENE14</td>" in top
    assert "GENE15" not in genes  # rank 21: only the top 20 per candidate
    others = genes.split("Other genes of interest")[1]
    assert "CLU" in others and "BIN1" not in others  # only ranked ones


def test_cells_section_and_cell_level_columns_of_the_genes_of_interest(results):
    page = html.unescape(build(results))
    cells = section(page, "cells")
    assert "CELL NOTE" in cells and CAPTIONS["cells_umap"].format(dataset=DATASET) in cells
    assert (
        "L1[12,40]: genes whose expression goes with the effect (confirmed; 2 of 3 genes at "
        "q ≤ 0.05" in cells
    )
    assert cells.index(">CLU<") < cells.index(">APOE<") < cells.index("GENE3")
    genes = section(page, "genes")
    causal = genes.split("Causal gene ranking")[1].split("Genes of interest")[0]
    assert causal.index(">CAUSALGENE<") < causal.index(">APOE<")
    assert "L1[12,40] (starting model, masked expression)" in causal and ">BASEGENE<" in causal
    core = genes.split("Genes of interest")[1].split("Other genes")[0]
    apoe = core[core.index(">APOE<") :].split("</tr>")[0]  # token rank 3, cell-level rank 2
    values = re.findall(r"<td[^>]*>([^<]*)</td>", apoe)
    assert values[-7:] == ["93.1", "19.9", "0.02", "2", "3.73", "0.0002", "0.0003"]
    assert "cell-level z" in core and "token z" in core
    summary = section(page, "summary")
    assert "At the cell level, at q ≤ 0.05: APOE on L1[12,40] (z 3.73, q 0.0003)." in summary
    cls = genes.split("The <cls> token")[1].split("Top 20")[0]
    assert ">97.7<" in cls and ">95<" not in cls  # the overall row, not the per-type one


def test_genes_of_interest_at_the_cell_level_alone(results):
    """No channel mapped (no confirmed weight): the cell-level columns still list them."""
    goi = results / DATASET / "channels" / "genes_of_interest.tsv"
    goi.write_text(goi.read_text().splitlines()[0] + "\n")
    page = html.unescape(build(results))
    genes = section(page, "genes")
    assert "genes_of_interest.tsv has no rows" in genes
    core = genes.split("Genes of interest")[1].split("The <cls> token")[0]
    assert ">APOE<" in core and "3.73" in core and ">APP<" not in core
    assert "token rank" not in core
    assert "At the cell level, at q ≤ 0.05: APOE" in section(page, "summary")


def test_without_the_cell_map_the_page_says_so(results):
    shutil.rmtree(results / DATASET / "cells")
    page = html.unescape(build(results))
    assert "No cell map (results/demo/cells/summary.json is missing)." in section(page, "cells")
    assert "cell-level z" not in section(page, "genes")


def test_figures_are_embedded_and_nothing_is_fetched(results, png):
    page = build(results)
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert not [r for r in refs if re.match(r"(?i)\s*(https?:)?//", r)]
    files = [r for r in refs if not r.startswith(("#", "data:"))]
    assert "../results/demo/ablate/confirmed.tsv" in files  # summary facts link their tables
    assert all((results.parent / "report" / f).is_file() for f in files)
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_numbers_are_formatted_to_three_significant_digits():
    assert fmt(0.123456) == "0.123"
    assert fmt(-4.56789) == "-4.57"
    assert fmt(1234.5) == "1,230"
    assert fmt(12.0) == "12" and fmt(np.int64(1201)) == "1,201"
    assert fmt(1.234e-5) == "1.23e-05" and fmt(2.5e7) == "2.5e+07"
    assert fmt(float("nan")) == "–" and fmt(None) == "–"
    assert fmt(True) == "yes" and fmt(np.bool_(False)) == "no"
    assert fmt(float("inf")) == "∞"


def test_long_tables_are_cut_with_a_note():
    frame = pd.DataFrame({"gene": [f"G{i}" for i in range(30)], "score": np.arange(30) / 7})
    table = make_table(frame, source="results/demo/x.tsv", max_rows=25)
    assert len(table.rows) == 25
    assert table.note == "Showing the first 25 of 30 rows; the full table is results/demo/x.tsv."
    assert table.rows[1]["cells"] == [("G1", ""), ("0.143", "num")]
    assert make_table(frame.head(3)).note == ""


def test_missing_optional_outputs_become_sentences(results):
    root = results / DATASET
    for rel in ("enrich", "quantize", "channels"):
        shutil.rmtree(root / rel)
    for rel in ("probe/layernorm.tsv", "probe/summary.json", "ablate/scaling.png",
                "ablate/topk.tsv", "finetune/checkpoint/args.json"):  # fmt: skip
        (root / rel).unlink()
    page = html.unescape(build(results))
    assert "No candidate reached enrichment." in section(page, "pathways")
    assert "Quantization was not run." in section(page, "summary")
    assert "No quantization results (results/demo/quantize/quantize.tsv is missing)." in page
    assert "Figure not available (results/demo/ablate/scaling.png is missing)." in page
    assert "No channel was mapped to genes" in section(page, "genes")
    assert "results/demo/probe/layernorm.tsv is missing" in section(page, "probe")
    assert "The probe accepted 1 candidate and listed 2 spikes in all." in page
    assert "results/demo/finetune/checkpoint/args.json is missing" in page


def test_cell_level_enrichment_is_named_as_such(results):
    enrich_dir = results / DATASET / "enrich"
    summary = pd.read_csv(enrich_dir / "summary.tsv", sep="\t")
    cell = summary.assign(ranking="cell", folder="L1_12_40_cell", n_significant=0,
                          n_enriched=0, n_depleted=0, n_ad_enriched=0)  # fmt: skip
    pd.concat([summary.assign(ranking="token"), cell]).to_csv(
        enrich_dir / "summary.tsv", sep="\t", index=False
    )
    shutil.copytree(enrich_dir / "L1_12_40", enrich_dir / "L1_12_40_cell")
    page = html.unescape(build(results))
    assert "L1[12,40] (cell-level): 0 gene sets of 120 enriched at q ≤ 0.05, 0 AD-related" in page
    assert "<h3>L1[12,40] (cell-level)</h3>" in section(page, "pathways")


def test_enrich_folder_without_candidates_says_so(results):
    shutil.rmtree(results / DATASET / "enrich" / "L1_12_40")
    page = build(results)
    assert "No candidate reached enrichment." in section(page, "pathways")
    assert "No candidate reached enrichment." in section(page, "summary")


@pytest.mark.parametrize("name", list(REQUIRED))
def test_missing_required_input_is_a_user_error(results, name):
    (results / DATASET / INPUT_FILES[name]).unlink()
    out = results.parent / "report" / "demo.html"
    with pytest.raises(UserError, match=re.escape(INPUT_FILES[name])):
        build_report(results / DATASET, DATASET, CONFIG, out)
    assert not out.exists()


def test_report_reads_only_its_named_inputs(results):
    """Each input moved elsewhere and passed by name: nothing is missing from the page."""
    moved = {}
    for name, rel in INPUT_FILES.items():
        moved[name] = Path("elsewhere") / f"{name}{Path(rel).suffix}"
        moved[name].parent.mkdir(exist_ok=True)
        shutil.move(results / DATASET / rel, moved[name])
    shutil.rmtree(results)
    page = build_report(moved, DATASET, CONFIG, Path("moved.html")).read_text()
    assert 'class="missing"' not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(FIGURES)
    moved["topk"].unlink()
    page = build_report(moved, DATASET, CONFIG, Path("moved.html")).read_text()
    assert "No topk table (elsewhere/topk.tsv is missing)." in page


def test_report_rule_lists_the_files_the_report_reads():
    block = (RULES / "report.smk").read_text().split("input:")[1].split("output:")[0]
    fixed = {k: v for k, v in INPUT_FILES.items() if k not in OPTIONAL_INPUTS}
    assert dict(re.findall(r'(\w+)="results/\{dataset\}/([^"]+)",', block)) == fixed
    for name in OPTIONAL_INPUTS:  # a function giving the path, or nothing where not run
        assert re.search(rf"\n\s+{name}=\w+,\n", block), name


def snakemake_caption(rst: Path, dataset: str) -> str:
    """A caption file as `snakemake --report` shows it (Jinja, then reStructuredText), as text."""
    wildcards = SimpleNamespace(dataset=dataset)
    text = jinja2.Template(rst.read_text()).render(snakemake=SimpleNamespace(wildcards=wildcards))
    strict = {"report_level": 2, "halt_level": 2}  # a warning is an error
    body = publish_parts(text, writer="html", settings_overrides=strict)["body"]
    return html.unescape(re.sub(r"<[^>]+>", "", body)).strip()


def test_figure_captions_are_those_of_snakemakes_report(results, png):
    figures = {
        rel: (smk.parent / caption).resolve()
        for smk in RULES.glob("*.smk")
        for rel, caption in SHOWN_BY_SNAKEMAKE.findall(smk.read_text())
        if rel.endswith(".png")
    }
    assert len(figures) == 14
    for rel in figures:  # each figure's own bytes, to tell them apart in the page
        (results / DATASET / rel).write_bytes(png + rel.encode())
    page = build(results)
    shown = {
        base64.b64decode(src.split(",", 1)[1]): html.unescape(text)
        for src, text in re.findall(r'<img src="([^"]+)" alt="[^"]*"><figcaption>(.*?)<', page)
    }
    for rel, rst in figures.items():
        assert shown[png + rel.encode()] == snakemake_caption(rst, DATASET), rel


def test_report_is_written_atomically_and_replaced(results):
    out = results.parent / "report" / "demo.html"
    out.parent.mkdir()
    out.write_text("old")
    build_report(results / DATASET, DATASET, CONFIG, out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.html"]


# --- headless browser -------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_report_renders_in_a_browser(results, tmp_path):
    out = build_report(results / DATASET, DATASET, CONFIG, tmp_path / "demo.html")
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>notDefined();</script></body></html>")
    assert page_errors(chromium(tmp_path, "broken", broken, "--dump-dom").stderr)
    dom = chromium(tmp_path, "dom", out, "--dump-dom")
    assert page_errors(dom.stderr) == []
    for name in SECTIONS:
        assert re.search(rf'<section id="{name}">\s*<h2>', dom.stdout), name
    assert "1 super weight: layer 1" in dom.stdout
    shot = tmp_path / "report.png"
    run = chromium(tmp_path, "shot", out, f"--screenshot={shot}", "--window-size=1280,4000")
    assert page_errors(run.stderr) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


MEASURE = """<script>
const figures = [...document.querySelectorAll("main > section > figure img")];
const out = document.createElement("pre");
out.id = "layout";
out.textContent = JSON.stringify({
  window: window.innerWidth,
  viewport: document.documentElement.clientWidth,
  page: document.documentElement.scrollWidth,
  figures: figures.map(img => Math.round(img.getBoundingClientRect().width)),
  tables: [...document.querySelectorAll(".table-wrap")].map(t => t.clientWidth),
});
document.body.appendChild(out);
</script>"""


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_report_layout_at_1280_pixels(results, tmp_path):
    """No horizontal overflow of the page; every main figure at least 800 px wide; tables
    scroll inside their box."""
    out = build_report(results / DATASET, DATASET, CONFIG, tmp_path / "demo.html")
    measured = tmp_path / "measured.html"
    measured.write_text(out.read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium(tmp_path, "layout", measured, "--window-size=1280,4000", "--dump-dom")
    layout = json.loads(html.unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout)[1]))
    assert layout["window"] == 1280 and layout["page"] <= layout["viewport"]
    assert len(layout["figures"]) >= 14 and min(layout["figures"]) >= 800
    assert max(layout["tables"]) <= layout["viewport"]


def test_the_summary_states_the_positive_control_beside_a_null_result(results):
    no_super_weight = {"tier": "not confirmed", "confirmed": False}
    table = pd.read_csv(results / DATASET / "ablate/confirmed.tsv", sep="\t")
    table.assign(**no_super_weight).to_csv(results / DATASET / "ablate/confirmed.tsv", sep="\t")
    page = build(results)
    headline = re.search(r'<p class="headline[^"]*">(.*?)</p>', page, re.S)[1]
    assert headline.startswith("No super weight")
    assert "A planted super weight (Δ log p 0.123 nats per cell) was found, confirmed, " in headline
    assert "traced to its genes and its gene set enriched" in headline
    summary = section(page, "summary")
    assert "L1[5,36]" in summary and "0.0567 to 0.201" in summary and "AUC 0.97, " in summary
    assert "Mann-Whitney p 0.0021" in summary
    assert "Sensitivity shown" in summary and "q over all tests 0.0123" in summary
    genes = section(page, "control")
    assert "CTRLA" in genes and "rank by super activation" in genes


def test_a_failed_control_says_where_and_what_it_means(results):
    failed = CONTROL_SCORE | {"traced": False, "enriched": False, "passed": False,
                              "failed_at": "traced"}  # fmt: skip
    (results / DATASET / "control/score.json").write_text(json.dumps(failed))
    summary = section(build(results), "summary")
    assert (
        "Detection shown (a planted super weight of this size is found and confirmed), the "
        in summary
    )
    assert "gene level not: its genes did not lead the causal ranking (AUC below 0.8 or " in summary
    assert "Mann-Whitney p above 0.05)" in summary
    missed = CONTROL_SCORE | {"found": False, "recovered": False, "traced": False,
                              "enriched": False, "passed": False, "failed_at": "found",
                              "probe_reason": "input ratio 3 < 10"}  # fmt: skip
    (results / DATASET / "control/score.json").write_text(json.dumps(missed))
    summary = section(build(results), "summary")
    assert "was missed by the probe (input ratio 3 &lt; 10)" in summary
    (results / DATASET / "control/score.json").unlink()
    assert "The control&#39;s score is missing" in section(build(results), "summary")
