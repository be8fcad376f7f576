"""Captions: written once (superweights.captions), the .rst files generated and current."""

import re
from pathlib import Path

from docutils.core import publish_parts

from superweights.captions import CAPTIONS, HTML_ONLY, rst_text, write_rst

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "workflow" / "report"
REGENERATE = "run: python -m superweights.captions workflow/report"


def test_rst_files_are_generated_from_the_captions():
    names = {p.stem for p in REPORT.glob("*.rst")}
    assert names == set(CAPTIONS) - set(HTML_ONLY), REGENERATE
    for name in names:
        assert (REPORT / f"{name}.rst").read_text() == rst_text(name), f"{name}: {REGENERATE}"


def test_write_rst_writes_every_shown_caption(tmp_path):
    paths = write_rst(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert (tmp_path / "qc_figure.rst").read_text() == (
        "Cells of {{ snakemake.wildcards.dataset }} kept at each QC step (left) and cells per "
        "cell type in the donor-wise splits (right).\n"
    )


def test_every_rule_caption_is_a_generated_file():
    rules = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    used = set(re.findall(r'caption="\.\./report/(\w+)\.rst"', rules))
    assert used == {p.stem for p in REPORT.glob("*.rst")}


def test_captions_are_plain_restructured_text():
    strict = {"report_level": 2, "halt_level": 2}  # a warning is an error
    for name, text in CAPTIONS.items():
        body = publish_parts(text, writer="html", settings_overrides=strict)["body"]
        assert re.fullmatch(r"<p>[^<]*</p>\n", body), f"{name} is not one plain paragraph"
