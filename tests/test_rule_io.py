"""A UserError ends a rule script as it ends the `superweights` command: one line, exit 2."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from superweights.errors import UserError
from superweights.rule_io import rule_log

ROOT = Path(__file__).resolve().parents[1]


def test_rule_log_writes_one_error_line_and_exits_2(tmp_path):
    log = tmp_path / "rule.log"
    with pytest.raises(SystemExit) as stopped:
        with rule_log(SimpleNamespace(log=[str(log)])):
            logging.getLogger("superweights.test").info("working")
            raise UserError("the input is wrong;\n   fix it")
    assert stopped.value.code == 2
    lines = log.read_text().splitlines()
    assert lines[0].endswith("INFO working")
    assert lines[-1] == "error: the input is wrong; fix it"
    assert sys.stderr is sys.__stderr__


def test_rule_log_lets_other_errors_through(tmp_path):
    with pytest.raises(KeyError):
        with rule_log(SimpleNamespace(log=[str(tmp_path / "rule.log")])):
            raise KeyError("a bug, not a user error")
    assert sys.stderr is sys.__stderr__


def test_rule_script_and_cli_exit_2_with_the_same_line(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not an h5ad file")
    script = ROOT / "workflow" / "scripts" / "preprocess.py"
    (tmp_path / "Snakefile").write_text(
        textwrap.dedent(
            f"""
            rule preprocess:
                input: data="bad.h5ad", vocab=[]
                output: h5ad="tok.h5ad", qc="qc.tsv", figure="qc.png"
                log: "preprocess.log"
                params: settings={{}}
                script: "{script}"
            """
        )
    )
    rule = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "tok.h5ad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert rule.returncode != 0
    assert "non-zero exit status 2" in rule.stdout + rule.stderr
    log = (tmp_path / "preprocess.log").read_text()
    rule_errors = [line for line in log.splitlines() if "error" in line]

    cli = subprocess.run(
        [sys.executable, "-m", "superweights.cli", "preprocess", "bad.h5ad", "--out", "cli.h5ad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2
    cli_errors = [line for line in cli.stderr.splitlines() if "error" in line]
    assert len(rule_errors) == 1 and rule_errors == cli_errors
    assert "not an HDF5" in rule_errors[0]
    assert not (tmp_path / "tok.h5ad").exists() and not (tmp_path / "cli.h5ad").exists()
