"""Project-level checks: config vs defaults, lint and formatting (conda envs: test_envs.py)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from superweights.config import validate_config
from superweights.data.preprocess import PreprocessSettings
from superweights.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_config_defaults_match_library_defaults():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(PreprocessSettings)
    }
    assert config["preprocess"] == defaults


def test_config_sections_have_exactly_the_library_settings():
    from superweights.ablate import AblateSettings
    from superweights.channels import ChannelSettings
    from superweights.enrich import EnrichSettings, GeneSetSettings
    from superweights.model.train import ModelSettings, TrainSettings
    from superweights.probe_cells import ProbeSettings
    from superweights.quantize import QuantizeSettings

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    sections = {
        "pretrain": TrainSettings,
        "finetune": TrainSettings,
        "probe": ProbeSettings,
        "ablate": AblateSettings,
        "channels": ChannelSettings,
        "enrich": EnrichSettings,
        "gene_sets": GeneSetSettings,
        "quantize": QuantizeSettings,
    }
    for name, settings in sections.items():
        assert set(config[name]) == {f.name for f in dataclasses.fields(settings)}, name
    fields = {f.name for f in dataclasses.fields(ModelSettings)}
    assert set(config["model"]["architecture"]) == fields


@pytest.mark.parametrize("preset", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_config_files_validate(preset):
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate_config(deep_merge(base, yaml.safe_load(preset.read_text())))


def deep_merge(base: dict, update: dict) -> dict:
    """Merge as Snakemake merges --configfile into the config: dicts recursively."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = deep_merge(merged[key], value)
        merged[key] = value
    return merged


def test_config_documentation_covers_every_key():
    doc = (ROOT / "config" / "README.md").read_text()
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for section, value in config.items():
        assert f"`{section}`" in doc
        if isinstance(value, dict) and section != "datasets":
            for key in value:
                assert f"`{key}`" in doc, f"{section}.{key} is not documented"


def test_wrong_config_type_is_rejected():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["preprocess"]["min_genes"] = "many"
    with pytest.raises(UserError, match="preprocess/min_genes"):
        validate_config(config)


def run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_snakemake_rejects_bad_config_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  n_hvg: lots\n")
    result = run(sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "n_hvg" in result.stdout + result.stderr
    assert "lots" in result.stdout + result.stderr


def test_snakemake_lint_is_clean():
    result = run(sys.executable, "-m", "snakemake", "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_check():
    files = ["Snakefile", *map(str, (ROOT / "workflow" / "rules").glob("*.smk"))]
    result = run("snakefmt", "--check", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
