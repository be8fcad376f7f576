"""A non-editable install finds the config schema and the shipped gene sets as package data."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

NOT_SOURCE = (".git", ".venv", "results", ".snakemake", "build", "*.egg-info", "__pycache__")

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import yaml
    import superweights
    from superweights.config import SCHEMA_PATH, validate_config
    from superweights.enrich import GeneSetSettings, load_gene_sets

    assert Path(superweights.__file__).is_relative_to(sys.prefix), superweights.__file__
    validate_config(yaml.safe_load(Path(sys.argv[1]).read_text()))
    sets = load_gene_sets(GeneSetSettings(packaged=()))
    print(SCHEMA_PATH)
    print(" ".join(f"{name}:{len(terms)}" for name, terms in sorted(sets.items())))
    """
)


def test_wheel_installs_with_schema_and_gene_sets(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("superweights-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True
    )
    # Dependencies (torch, gseapy, ...) come from this environment, appended after the
    # new venv's own site-packages, so `superweights` itself resolves to the installed wheel.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [python, "-c", CHECK, ROOT / "config" / "config.yaml"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    schema, libraries = result.stdout.split("\n")[:2]
    assert schema.startswith(str(venv)) and schema.endswith("superweights/config.schema.yaml")
    assert libraries == "alzheimers_curated:7 bellenguez2022_gwas:1"
