"""The demo pipeline through the SLURM profile on a single-node SLURM started here."""

import os
import re
import subprocess

import anndata as ad
import pandas as pd
import pytest

from conftest import ROOT, run_snakemake
from slurm_cluster import LocalSlurm, why_unavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REASON = why_unavailable()
if REASON and os.environ.get("SUPERWEIGHTS_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"SLURM test required but cannot run: {REASON}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if REASON:
        pytest.skip(REASON)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield slurm.start()
    finally:
        slurm.stop()


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_run")
    result = run_snakemake(workdir, "--profile", str(ROOT / "profiles" / "slurm"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir, result.stdout + result.stderr


def completed_jobs() -> list[dict]:
    """Jobs the controller remembers (MinJobAge keeps finished ones), as key=value dicts."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True)
    jobs = []
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        jobs.append(fields)
    return jobs


def test_jobs_went_through_slurm(slurm_run):
    _, output = slurm_run
    submitted = set(re.findall(r"SLURM jobid (\d+)", output))
    assert len(submitted) >= 9, output[-3000:]
    jobs = {job["JobId"]: job for job in completed_jobs()}
    assert submitted <= set(jobs)
    states = {j: jobs[j]["JobState"] for j in submitted}
    assert set(states.values()) == {"COMPLETED"}, (states, output[-3000:])
    comments = " ".join(jobs[j].get("Comment", "") for j in submitted)
    for rule in ("fetch", "preprocess", "pretrain", "finetune", "probe", "ablate", "report"):
        assert f"rule_{rule}" in comments, rule
    gpu_jobs = [
        j
        for j in submitted
        if "gpu" in jobs[j].get("TresPerNode", "") + jobs[j].get("TresPerJob", "")
    ]
    assert gpu_jobs, "no job asked SLURM for a GPU"


def test_outputs_match_a_local_run(slurm_run, small_run):
    slurm_results = slurm_run[0] / "results" / "small"
    local = ad.read_h5ad(small_run / "preprocess/tokenised.h5ad")
    remote = ad.read_h5ad(slurm_results / "preprocess/tokenised.h5ad")
    assert (local.X != remote.X).nnz == 0
    for table in ("probe/candidates.tsv", "ablate/collapse.tsv", "quantize/quantize.tsv"):
        a = pd.read_csv(small_run / table, sep="\t")
        b = pd.read_csv(slurm_results / table, sep="\t")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    a = (small_run / "finetune/metrics.json").read_text()
    b = (slurm_results / "finetune/metrics.json").read_text()
    strip = re.compile(r'"(train_)?seconds": [0-9.e+-]+')
    assert strip.sub("", a) == strip.sub("", b)
