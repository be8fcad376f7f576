"""The whole pipeline end to end on a small demo (local run shared with the SLURM test)."""

import json
import shutil

import anndata as ad
import pandas as pd
import pytest

from helpers import SMALL_CONFIG, run_snakemake

pytestmark = pytest.mark.slow

STAGE_OUTPUTS = [
    "raw/data.h5ad",
    "preprocess/tokenised.h5ad",
    "preprocess/qc.png",
    "pretrain/checkpoint/args.json",
    "finetune/checkpoint/model.safetensors",
    "finetune/metrics.json",
    "finetune/confusion.png",
    "probe/candidates.tsv",
    "probe/layer_spikes.png",
    "ablate/confirmed.tsv",
    "ablate/forest.png",
    "base/confirm/confirmed.tsv",
    "persistence/persistence.tsv",
    "channels/genes_of_interest.tsv",
    "enrich/summary.tsv",
    "base/enrich/summary.tsv",
    "quantize/quantize.tsv",
    "report.html",
]


def test_every_stage_writes_its_outputs(small_run):
    for rel in STAGE_OUTPUTS:
        path = small_run / rel
        assert path.is_file() and path.stat().st_size > 0, rel
    assert (small_run / "benchmarks" / "finetune.tsv").is_file()
    assert "error" not in (small_run / "logs" / "finetune.log").read_text().lower()


def test_outputs_are_consistent_across_stages(small_run):
    tokenised = ad.read_h5ad(small_run / "preprocess/tokenised.h5ad")
    metrics = json.loads((small_run / "finetune/metrics.json").read_text())
    test_cells = int((tokenised.obs["split"] == "test").sum())
    assert metrics["n_cells"] == test_cells
    assert metrics["classes"] == list(tokenised.obs["cell_type"].cat.categories)
    candidates = pd.read_csv(small_run / "probe/candidates.tsv", sep="\t")
    confirmed = pd.read_csv(small_run / "ablate/confirmed.tsv", sep="\t")
    assert len(candidates) > 0

    def coords(frame):
        return set(zip(frame["layer"], frame["row"], frame["col"], strict=True))

    assert len(confirmed) > 0
    assert coords(confirmed) <= coords(candidates)
    # The probe selects on validation cells; the confirmation evaluates test cells only.
    cells = pd.read_csv(small_run / "ablate/cells.tsv", sep="\t")
    split = tokenised.obs["split"].astype(str)
    assert set(split[cells["cell_id"].astype(str)]) == {"test"}
    probed = pd.read_csv(small_run / "probe/cells.tsv", sep="\t")
    assert set(probed["split"]) == {"val"}
    persistence = pd.read_csv(small_run / "persistence/persistence.tsv", sep="\t")
    assert coords(confirmed) <= coords(persistence)
    quantized = pd.read_csv(small_run / "quantize/quantize.tsv", sep="\t")
    original = quantized[quantized["scheme"] == "fp32"]["mean_log_likelihood"].iloc[0]
    assert original == pytest.approx(metrics["mean_log_likelihood"], abs=1e-4)


def test_report_has_every_section(small_run):
    html = (small_run / "report.html").read_text()
    sections = (
        "summary",
        "data",
        "probe",
        "pruning",
        "genes",
        "pathways",
        "quantization",
        "control",
    )
    for section in sections:
        assert f'id="{section}' in html, section
    assert "data:image/png;base64," in html

    # the small config turns the control off, and the page says what that means
    assert "Not run (positive_control.enabled is false)" in html


@pytest.fixture(scope="module")
def control_run(small_run, tmp_path_factory):
    """The small run, copied, with the positive control turned on: only the control's rules
    and the report run again."""
    workdir = tmp_path_factory.mktemp("control_run")
    shutil.copytree(small_run.parents[1], workdir, dirs_exist_ok=True, symlinks=True)
    config = workdir / "control.yaml"
    off, on = "{enabled: false}", "{enabled: true, min_coverage: 0.5, min_genes: 5}"  # small data
    assert off in SMALL_CONFIG.read_text()
    config.write_text(SMALL_CONFIG.read_text().replace(off, on))
    result = run_snakemake(workdir, "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "results" / "small"


def test_control_runs_the_same_stages_on_the_planted_model(control_run):
    control = control_run / "control"
    planted = json.loads((control / "plant/planted.json").read_text())
    score = json.loads((control / "score.json").read_text())
    assert score["candidate"] == planted["candidate"]
    # the control's confirmation tests the planted weight alone, with both nulls and a tier
    confirmed = pd.read_csv(control / "ablate/confirmed.tsv", sep="\t")
    assert confirmed["candidate"].tolist() == [planted["candidate"]]
    assert {"tier", "p_contribution", "recovered"} <= set(confirmed.columns)
    assert score["tier"] == confirmed["tier"].iloc[0]
    # the probe's own table says whether it found it, as the score does
    candidates = pd.read_csv(control / "probe/candidates.tsv", sep="\t")
    at = candidates[["layer", "row", "col"]].eq([planted[k] for k in ("layer", "row", "col")])
    mine = candidates[at.all(axis=1)]
    assert score["found"] == bool(len(mine) and mine["accepted"].iloc[0])
    # the cell-level association of the planted weight, its planted genes' ranks in the score
    association = pd.read_csv(control / "cells/association.tsv", sep="\t")
    assert set(association["candidate"]) <= {planted["candidate"]}
    assert score["association"]["n_ranked"] == len(association)
    # the user's own results are untouched: no control rule writes outside control/
    user = (control_run / "ablate/confirmed.tsv").stat().st_mtime
    assert user < (control / "score.json").stat().st_mtime
    html = (control_run / "report.html").read_text()
    assert planted["candidate"] in html and "Positive control" in html
    assert "Not run (positive_control.enabled is false)" not in html
