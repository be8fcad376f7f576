"""Per-dataset settings: each `datasets:` entry may override source, labels and strata."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from superweights.config import dataset_configs, validate_config
from superweights.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
"""The demo config with its defaults filled in, as Snakemake's validation fills them."""


def with_datasets(*entries) -> dict:
    return CONFIG | {"datasets": list(entries)}


def test_overrides_apply_to_their_dataset_only():
    config = with_datasets(
        {"name": "mtg", "source": "seaad", "seaad": {"region": "MTG", "n_donors": 12}},
        {"name": "dlpfc", "source": "seaad", "seaad": {"region": "DLPFC"},
         "ablate": {"strata_columns": ["Braak"]}},
        {"name": "rosmap", "source": "rosmap", "rosmap": {"path": "/data/rosmap"},
         "preprocess": {"label_column": "broad.cell.type", "donor_column": "projid"},
         "ablate": {"strata_columns": ["braaksc", "ceradsc", "cogdx"]}},
    )  # fmt: skip
    merged = dataset_configs(validate_config(config))
    assert merged["mtg"]["seaad"]["region"] == "MTG" and merged["mtg"]["seaad"]["n_donors"] == 12
    assert merged["dlpfc"]["seaad"]["region"] == "DLPFC"
    assert merged["dlpfc"]["seaad"]["n_donors"] == CONFIG["seaad"]["n_donors"]  # global kept
    assert merged["dlpfc"]["ablate"]["strata_columns"] == ["Braak"]
    assert merged["mtg"]["ablate"]["strata_columns"] == CONFIG["ablate"]["strata_columns"]
    assert merged["rosmap"]["preprocess"]["label_column"] == "broad.cell.type"
    assert merged["rosmap"]["ablate"]["n_null"] == CONFIG["ablate"]["n_null"]
    assert CONFIG["seaad"]["region"] == "MTG" and "datasets" in CONFIG  # global untouched


@pytest.mark.parametrize(
    "entries, message",
    [
        (({"name": "a", "source": "demo"}, {"name": "a", "source": "demo"}), "more than once"),
        (({"name": "a", "source": "demo", "ablate": {"n_null": 0}},), "dataset a: config"),
        (({"name": "a", "source": "demo", "seaad": {"regionn": "MTG"}},), "dataset a: config"),
    ],
)
def test_bad_dataset_entries_are_refused(entries, message):
    with pytest.raises(UserError, match=message):
        dataset_configs(with_datasets(*entries))


def run_dry(tmp_path, config) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"),
           "-d", str(tmp_path), "--configfile", str(path)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


def test_two_datasets_run_in_one_invocation_and_bad_entries_stop_it(tmp_path):
    config = with_datasets(
        {"name": "small", "source": "demo", "demo": {"n_cells": 2000}},
        {"name": "large", "source": "demo"},
    )
    result = run_dry(tmp_path, config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "results/small/report.html" in result.stdout
    assert "results/large/report.html" in result.stdout
    for entries in (
        [{"name": "a", "source": "demo"}, {"name": "a", "source": "demo"}],
        [{"name": "a", "source": "nowhere"}],
    ):
        result = run_dry(tmp_path, CONFIG | {"datasets": entries})
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert not (tmp_path / "results").exists()


def test_pretraining_a_toy_model_on_real_data_is_said_loudly(tmp_path):
    """Without model.checkpoint, a real dataset gets the demo-sized model pretrained on it:
    the dry run says so; the demo alone does not warn."""
    local = with_datasets({"name": "mine", "source": "local", "local": {"path": "mine.h5ad"}})
    result = run_dry(tmp_path, local)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WARNING: model.checkpoint is empty, so a small model (4 layers x 64)" in result.stderr
    assert "pretrained here on mine" in result.stderr
    assert "WARNING: model.checkpoint" not in run_dry(tmp_path, CONFIG).stderr
