"""Hostile names in data: HTML and JavaScript in cell types, gene symbols and donor IDs are
shown as text in the report, and no path is ever built from a name outside its folder."""

import io
import json
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from helpers import CHROMIUM, CONFIG, DATASET, chromium, page_errors, write_results
from superweights.data.download import cache_path
from superweights.errors import UserError
from superweights.outputs import save_figure
from superweights.report import build_report

# Each replaces a name of the report's test results in every table and JSON file.
HOSTILE = {
    "Astrocyte": "<script>document.title='PWNED'</script>Astro",
    "Microglia-PVM": '"><svg onload="document.body.dataset.pwned=1">',
    "L2/3 IT": "../../escaped/L2/3 IT",
    "APOE": '<img src=x onerror="document.body.dataset.pwned=2">',
    "CLU": "</td></tr></table><iframe src=javascript:parent.document.title='PWNED'>",
}
INJECTED = re.compile(r"<(script>document|svg onload|img src=\"?x|iframe)", re.IGNORECASE)


@pytest.fixture(scope="module")
def png() -> bytes:
    figure = Figure(figsize=(2, 1))
    figure.add_subplot().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=40)
    return buffer.getvalue()


@pytest.fixture
def hostile_report(tmp_path, monkeypatch, png) -> Path:
    """The report of results whose cell types and genes hold markup; built in tmp_path."""
    monkeypatch.chdir(tmp_path)
    root = write_results(Path("results"), png)
    for path in [*root.rglob("*.tsv"), *root.rglob("*.json")]:
        text = path.read_text()
        for name, hostile in HOSTILE.items():
            text = text.replace(
                name, json.dumps(hostile)[1:-1] if path.suffix == ".json" else hostile
            )
        path.write_text(text)
    before = sorted(tmp_path.parent.iterdir())
    out = build_report(root, DATASET, CONFIG, Path("results") / "report.html")
    assert sorted(tmp_path.parent.iterdir()) == before  # nothing written beside tmp_path
    assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} == {"results"}
    return tmp_path / out


def test_hostile_names_are_escaped_text_in_the_report(hostile_report):
    page = hostile_report.read_text()
    assert not INJECTED.search(page), INJECTED.search(page)
    assert "&lt;script&gt;document.title=" in page
    assert "&lt;img src=x onerror=" in page
    assert "../../escaped/L2/3 IT" in page  # a name, shown as it is


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_hostile_names_run_no_script_and_add_no_element_in_a_browser(hostile_report, tmp_path):
    dom = chromium(tmp_path, "hostile", hostile_report, "--dump-dom")
    assert page_errors(dom.stderr) == []
    assert "PWNED" not in re.search(r"<title>(.*?)</title>", dom.stdout, re.S)[1]
    assert "data-pwned" not in dom.stdout
    assert not INJECTED.search(dom.stdout), INJECTED.search(dom.stdout)
    assert "&lt;img src=x onerror=" in dom.stdout  # the name is there, as text


@pytest.mark.parametrize(
    ("remote", "cached"),
    [
        ("https://host.example/meta/donors.csv?sig=1", "donors.csv"),
        ("bucket/release/H20.33.001_SEAAD_MTG.h5ad", "H20.33.001_SEAAD_MTG.h5ad"),
        ("https://host.example/a/%2E%2E", "%2E%2E"),  # not decoded: a plain name
    ],
)
def test_cache_names_are_plain_file_names(tmp_path, remote, cached):
    assert cache_path(tmp_path, remote) == tmp_path / cached


@pytest.mark.parametrize(
    "remote", ["https://host.example/meta/..", "bucket/.", "https://host.example/a\\..\\b", ""]
)
def test_names_that_would_leave_the_cache_are_refused(tmp_path, remote):
    with pytest.raises(UserError, match="cannot cache .* under a safe file name"):
        cache_path(tmp_path, remote)


def test_figure_labels_from_data_are_drawn_as_text_not_mathtext(tmp_path, png):
    figure = Figure(figsize=(2, 1))
    ax = figure.add_subplot()
    ax.bar([0, 1], [1, 2], tick_label=["Oligo$\\frac$ 1", "$x^$"])
    ax.set_title("<b>$\\sqrt{$</b>")
    path = save_figure(figure, tmp_path / "labels.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
