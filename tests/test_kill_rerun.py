"""Kill the workflow with SIGKILL at several points, rerun it, and get the same tables.

One run on the small config is killed (its whole process group, as a node failure or the
OOM killer would) during fine-tuning (after epoch 1 saved its state), during the probe,
during the confirmation (rule `ablate`) and during the report, each time rerun as a user
is told to (`snakemake --unlock`, then `--rerun-incomplete`). Every output must then equal
that of the uninterrupted run of the session (`small_run`), byte for byte on the CPU, apart
from wall times. Jobs that were not killed ran from scratch in both runs, so this is also
the check that two runs with the same seed give the same files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, SMALL_CONFIG, run_snakemake

pytestmark = pytest.mark.slow

WALL_TIME = re.compile(r"(\w+_)?seconds")
"""Columns and JSON keys that hold wall times (training, spike passes), left out of the
comparison: they measure the machine, not the result."""
NOT_COMPARED = ("logs", "benchmarks")  # rule logs (times, progress bars) and benchmark timings


def comparable(path: Path) -> bytes:
    """The file's bytes, without wall-time columns (TSV) or keys (JSON)."""
    if path.suffix == ".tsv":
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        keep = [i for i, name in enumerate(rows[0]) if not WALL_TIME.fullmatch(name)]
        return "\n".join("\t".join(row[i] for i in keep) for row in rows).encode()
    if path.suffix == ".json":
        return json.dumps(_without_wall_times(json.loads(path.read_text()))).encode()
    return path.read_bytes()


def _without_wall_times(obj):
    if isinstance(obj, dict):
        return {k: _without_wall_times(v) for k, v in obj.items() if not WALL_TIME.fullmatch(k)}
    if isinstance(obj, list):
        return [_without_wall_times(v) for v in obj]
    return obj


def result_files(results: Path) -> list[Path]:
    return sorted(
        p.relative_to(results)
        for p in results.rglob("*")
        if p.is_file() and p.relative_to(results).parts[0] not in NOT_COMPARED
    )


def start(workdir: Path, *args: str) -> subprocess.Popen:
    """The workflow in its own process group, so one signal reaches every job it started."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(SMALL_CONFIG), "--cores", "2"]
    return subprocess.Popen(
        [*cmd, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    """SIGKILL the workflow's process group as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the workflow ended before {what}"
        assert time.monotonic() < deadline, f"no sign of {what} after {timeout} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def log_has(path: Path, text: str):
    return lambda: path.is_file() and text in path.read_text(errors="replace")


def test_killed_and_rerun_workflow_equals_an_uninterrupted_run(small_run, tmp_path):
    results = tmp_path / "results" / "small"
    logs = results / "logs"
    kill_points = [
        ("fine-tuning epoch 2", lambda: (results / "finetune" / "train_state.pt").is_file()),
        ("the probe", log_has(logs / "probe.log", "model tensors")),
        ("the confirmation", log_has(logs / "ablate.log", "confirm:")),
        ("the report", lambda: (logs / "report.log").is_file()),
    ]
    for i, (what, ready) in enumerate(kill_points):
        if i:  # a killed run leaves its lock: the user is told to unlock
            assert run_snakemake(tmp_path, "--unlock").returncode == 0
        kill_when(start(tmp_path, *(["--rerun-incomplete"] if i else [])), ready, what)
        assert not (results / "report.html").exists()
    assert run_snakemake(tmp_path, "--unlock").returncode == 0
    final = run_snakemake(tmp_path, "--cores", "2", "--rerun-incomplete")
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "resuming from" in (logs / "finetune.log").read_text()

    files = result_files(results)
    assert files == result_files(small_run)
    assert not [f for f in files if ".partial" in f.name or ".previous" in f.name]
    differ = [str(f) for f in files if comparable(results / f) != comparable(small_run / f)]
    assert not differ, f"differ from the uninterrupted run: {differ}"
