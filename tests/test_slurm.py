"""The demo pipeline through the SLURM profile on a single-node SLURM started here."""

import os
import re
import subprocess

import anndata as ad
import pandas as pd
import pytest
import yaml

from helpers import ROOT, run_snakemake
from slurm_cluster import LocalSlurm, why_unavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
CPU_PARTITION = PROFILE["default-resources"]["slurm_partition"]
(GPU_PARTITION,) = {r["slurm_partition"] for r in PROFILE["set-resources"].values()}
LOCAL_RULES = {"fetch", "report"}


def rules_declaring_gpu() -> set[str]:
    """Rules whose `resources:` ask for a GPU, read from the rule files themselves; a rule
    made by `use rule A as B with:` asks for one as A does, unless it sets its own resources."""
    gpu, base = {}, {}
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"^(?=rule \w+:|use rule )", path.read_text(), flags=re.M):
            if name := re.match(r"rule (\w+):", block):
                rule = name.group(1)
            elif name := re.match(r"use rule (\w+) as (\w+)", block):
                rule = name.group(2)
                if not re.search(r"^\s+resources:", block, flags=re.M):
                    base[rule] = name.group(1)
            else:
                continue
            gpu[rule] = bool(re.search(r"^\s+gpu=", block, flags=re.M))
    return {rule for rule in gpu if gpu[rule] or gpu.get(base.get(rule), False)}


GPU_RULES = rules_declaring_gpu()


def test_profile_sends_every_gpu_rule_to_the_gpu_partition():
    """A rule asking for a GPU on the CPU partition would be refused by a real cluster."""
    routed = {rule for rule, res in PROFILE["set-resources"].items() if "slurm_partition" in res}
    assert {"finetune", "probe", "ablate"} <= GPU_RULES
    assert GPU_RULES == routed


REASON = why_unavailable()
if REASON and os.environ.get("SUPERWEIGHTS_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"SLURM test required but cannot run: {REASON}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if REASON:
        pytest.skip(REASON)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), partitions=(CPU_PARTITION, GPU_PARTITION))
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


def rule_of(job: dict) -> str:
    """The rule a job ran, from the comment the SLURM plugin gives it."""
    return re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", job["Comment"]).group(1)


def test_jobs_went_through_slurm(slurm_run):
    _, output = slurm_run
    submitted = set(re.findall(r"SLURM jobid (\d+)", output))
    jobs = {job["JobId"]: job for job in completed_jobs()}
    assert submitted and submitted <= set(jobs), output[-3000:]
    states = {j: jobs[j]["JobState"] for j in submitted}
    assert set(states.values()) == {"COMPLETED"}, (states, output[-3000:])
    scheduled = set(re.findall(r"^rule (\w+):", output, flags=re.M))  # every non-local job
    assert {"preprocess", "finetune", "probe", "ablate"} <= scheduled, output[-3000:]
    assert {rule_of(jobs[j]) for j in submitted} == scheduled


def test_local_rules_ran_here_not_in_slurm(slurm_run):
    workdir, output = slurm_run
    rules = {rule_of(job) for job in completed_jobs()}
    assert rules and not rules & LOCAL_RULES, rules
    for rule in LOCAL_RULES:
        assert f"localrule {rule}:" in output, rule
    assert (workdir / "results" / "small" / "report.html").is_file()


def test_gpu_rules_went_to_the_gpu_partition(slurm_run):
    for job in completed_jobs():
        gpu = "gpu" in job.get("TresPerNode", "") + job.get("TresPerJob", "")
        expected = GPU_PARTITION if rule_of(job) in GPU_RULES else CPU_PARTITION
        assert job["Partition"] == expected, (rule_of(job), job["Partition"])
        assert gpu == (rule_of(job) in GPU_RULES), rule_of(job)


def test_outputs_match_a_local_run(slurm_run, small_run):
    slurm_results = slurm_run[0] / "results" / "small"
    local = ad.read_h5ad(small_run / "preprocess/tokenised.h5ad")
    remote = ad.read_h5ad(slurm_results / "preprocess/tokenised.h5ad")
    assert (local.X != remote.X).nnz == 0
    for table in ("probe/candidates.tsv", "ablate/confirmed.tsv", "quantize/quantize.tsv"):
        a = pd.read_csv(small_run / table, sep="\t")
        b = pd.read_csv(slurm_results / table, sep="\t")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    a = (small_run / "finetune/metrics.json").read_text()
    b = (slurm_results / "finetune/metrics.json").read_text()
    strip = re.compile(r'"(\w+_)?seconds": [0-9.e+-]+')  # wall times (train, spike passes)
    assert strip.sub("", a) == strip.sub("", b)
