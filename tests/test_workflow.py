"""The whole pipeline end to end on a small demo (local run shared with the SLURM test)."""

import json

import anndata as ad
import pandas as pd
import pytest

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
    for section in ("summary", "data", "probe", "pruning", "genes", "pathways", "quantization"):
        assert f'id="{section}' in html, section
    assert "data:image/png;base64," in html
