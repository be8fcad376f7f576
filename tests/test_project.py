"""Project-level checks: config files, lint and formatting (defaults: test_config_schema.py;
conda envs: test_envs.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from superweights.config import validate_config
from superweights.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


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
    config.setdefault("preprocess", {})["min_genes"] = "many"
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
