"""The scaled-down paper workflow of tests/test_paper.py through a real SLURM and the SLURM
profile: workflow/configs/pal.yaml (the reproduction with every kind of job: feature stores, token
sets, PAL, segmentation) over a fabricated miniature of its data, with only grid sizes, epochs
and models made smaller and one evaluation dataset per source (and the CPU instead of a GPU);
the STRUCTURE config's scaled-down run is in the test suite (tests/test_paper.py).

Needs a running single-node cluster: `make test-cluster` starts one with
workflow/scripts/slurm-cluster.sh, runs this file and stops the cluster. Collected only with
POSTALIGN_CLUSTER_TEST=1 (tests/cluster/conftest.py), so `make test` never runs it.

Checks: every rule job but the localrules ran inside a SLURM job submitted by sbatch
(slurmctld's log, the executor's per-job logs), the sbatch flags follow the rules' resources
(a group job's: those of its largest job, runtimes summed), the metrics equal a local run's,
a second run does nothing; both wall times are printed (and their ratio checked against
POSTALIGN_CLUSTER_MAX_RATIO when that is set; the goal is 2).
"""

import base64
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.evaluate.tables import read_metrics

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_paper import (  # noqa: E402
    PAL,
    fabricate_paper_data,
    paper_captions,
    scaled_down,
    tiny_roberta,
)

WORKFLOW_PROFILE = ROOT / "workflow/profiles/default"
SLURM_PROFILE = ROOT / "workflow/profiles/slurm"
# The cluster run's wall time against the local run's is printed; a timing is asserted only
# when asked for (POSTALIGN_CLUSTER_MAX_RATIO=2), never by default: CI machines are noisy.
MAX_RATIO = os.environ.get("POSTALIGN_CLUSTER_MAX_RATIO")
METRICS = "results/tables/metrics.parquet"
SUBMITTED = re.compile(r"^Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$")


def slurm(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def node_cpus() -> int:
    """The running cluster's node: up, and its CPUs (the profile's cap on a job's CPUs)."""
    if shutil.which("sinfo") is None:
        pytest.fail("no SLURM here: run `make test-cluster` (starts one)")
    try:
        states = slurm("sinfo", "-h", "-N", "-o", "%t %c").split()
    except subprocess.CalledProcessError as err:
        pytest.fail(f"sinfo failed ({err.stderr.strip()}): is the cluster up? make test-cluster")
    assert states[:1] and states[0].rstrip("*~#") in {"idle", "mix", "alloc", "comp"}, states
    return int(states[1])


def snakemake(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Snakemake as a user runs it, from the project's environment; output kept in a log."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "config.yaml"),
            "--workflow-profile",
            str(WORKFLOW_PROFILE),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    seconds = time.monotonic() - start
    result.output = result.stdout + result.stderr
    with open(workdir / "snakemake.log", "a") as log:
        log.write(result.output)
    return result, seconds


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """The scaled-down config's tiny RoBERTa, one for both runs (identical weights)."""
    folder = tmp_path_factory.mktemp("models") / "roberta"
    data = tmp_path_factory.mktemp("captions")
    fabricate_paper_data(data)
    tiny_roberta(folder, paper_captions(data))
    return folder


def paper_workdir(tmp_path_factory, name: str, text_model: Path) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    fabricate_paper_data(workdir)
    config = scaled_down(yaml.safe_load(PAL.read_text()), text_model)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, node_cpus, text_model):
    workdir = paper_workdir(tmp_path_factory, "local", text_model)
    result, seconds = snakemake(workdir, "--cores", str(node_cpus))
    assert result.returncode == 0, result.output[-4000:]
    return workdir, seconds


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, node_cpus, local_run, text_model):
    """The same config through the SLURM profile. --cores: this node's CPUs (the profile's
    value is for real nodes); compare_layers asks for 64 threads to show the cap at work."""
    workdir = paper_workdir(tmp_path_factory, "cluster", text_model)
    result, seconds = snakemake(
        workdir,
        "--profile",
        str(SLURM_PROFILE),
        "--cores",
        str(node_cpus),
        "--set-threads",
        "compare_layers=64",
        "--verbose",  # the executor logs each sbatch call at this level
    )
    assert result.returncode == 0, f"see {workdir / 'snakemake.log'}\n" + result.output[-4000:]
    return workdir, seconds, result.output


def submissions(output: str) -> dict[str, Path]:
    """SLURM job id -> the executor's log of that job, from Snakemake's own output."""
    found = {}
    for line in output.splitlines():
        match = SUBMITTED.match(line.strip())
        if match:
            found[match.group(2)] = Path(match.group(3))
    return found


def sbatch_calls(output: str) -> list[str]:
    return [
        line.split("sbatch call: ", 1)[1] for line in output.splitlines() if "sbatch call: " in line
    ]


def planned_jobs(output: str) -> dict[int, dict]:
    """Snakemake job id -> rule, threads, resources and whether it ran where Snakemake runs
    (a localrule), from the blocks Snakemake prints."""
    jobs, current = {}, None
    for line in output.splitlines():
        head = re.match(r"^\s*(local)?rule (\w+):$", line)  # indented in a group job
        if head:
            current = {
                "rule": head.group(2),
                "local": bool(head.group(1)),
                "wildcards": "",
                "threads": 1,
                "resources": {},
            }
            continue
        if current is None:
            continue
        if not line.startswith("    "):
            current = None
            continue
        key, _, value = line.strip().partition(": ")
        if key == "jobid":
            jobs[int(value)] = current
        elif key == "threads":
            current["threads"] = int(value)
        elif key == "wildcards":
            current["wildcards"] = ",".join(value.split(", "))
        elif key == "resources":
            current["resources"] = dict(item.split("=", 1) for item in value.split(", "))
    return jobs


def test_sbatch_runs_a_job(node_cpus, tmp_path):
    out = tmp_path / "hostname.out"
    slurm("sbatch", "--parsable", "--wait", "-o", str(out), "--wrap", "hostname")
    assert out.read_text().strip() == socket.gethostname()


def test_every_rule_job_ran_in_a_slurm_job(cluster_run):
    workdir, _, output = cluster_run
    submitted = submissions(output)
    calls = sbatch_calls(output)
    assert submitted and len(submitted) == len(calls)
    # slurmctld accepted each of them through sbatch
    config = slurm("scontrol", "show", "config")
    ctld_log = Path(re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", config, re.M).group(1))
    accepted = set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", ctld_log.read_text()))
    assert set(submitted) <= accepted, set(submitted) - accepted
    # one executor log per SLURM job, .snakemake/slurm_logs/<rule_|group_>*/.../<jobid>.log
    logs = sorted((workdir / ".snakemake/slurm_logs").rglob("*.log"))
    assert {p.resolve() for p in logs} == {p.resolve() for p in submitted.values()}
    for jobid, log in submitted.items():
        assert log.name == f"{jobid}.log"
        assert (
            log.relative_to(workdir / ".snakemake/slurm_logs")
            .parts[0]
            .startswith(("rule_", "group_"))
        )
    # the rule jobs executed inside those SLURM jobs are exactly the jobs Snakemake planned,
    # but for the workflow's localrules (aggregate, publish; `all` runs nothing), run where
    # Snakemake runs
    executed = Counter(
        rule for log in logs for rule in re.findall(r"^localrule (\w+):$", log.read_text(), re.M)
    )
    jobs = planned_jobs(output).values()
    local = Counter(job["rule"] for job in jobs if job["local"])
    assert set(local) == {"aggregate", "publish", "all"}, local
    planned = Counter(job["rule"] for job in jobs if not job["local"])
    assert executed == planned
    assert len(submitted) < sum(planned.values())  # small jobs were grouped
    print(
        f"\n{sum(planned.values())} rule jobs in {len(submitted)} SLURM jobs: {dict(planned)}; "
        f"run where Snakemake runs: {dict(local)}"
    )


def test_sbatch_flags_follow_the_rules_resources(cluster_run, node_cpus):
    """mem_mb -> --mem, runtime -> -t, threads (capped at --cores) -> --cpus-per-task,
    gpu = 0 -> no --gpus; the partition from partitions.yaml; no account. A group job (its
    jobs run one after another, one `slot` each) asks for the CPUs and memory of its largest
    job and the sum of their runtimes."""
    _, _, output = cluster_run
    calls = sbatch_calls(output)
    jobs = {(job["rule"], job["wildcards"]): job for job in planned_jobs(output).values()}
    checked = Counter()
    for call in calls:
        assert " -A " not in call and "--account" not in call, call
        assert " -p main " in call, call
        targets = re.search(r"--target-jobs ((?:'[^']+' ?)+)", call).group(1)
        members = [jobs[tuple(t.strip("'").split(":", 1))] for t in targets.split()]
        threads = max(job["threads"] for job in members)
        mem_mb = max(int(job["resources"]["mem_mb"]) for job in members)
        runtime = sum(int(job["resources"]["runtime"]) for job in members)
        gpu = max(int(job["resources"].get("gpu", "0")) for job in members)
        assert f" --mem {mem_mb} " in call, call
        assert f" -t {runtime} " in call, call
        assert f" --cpus-per-task={threads} " in call, call
        assert threads <= node_cpus
        assert ("--gpus" in call) == (gpu > 0), call
        assert ("/slurm_logs/group_" in call) == (len(members) > 1), call
        kind = "+".join(sorted({job["rule"] for job in members}))
        if not checked[kind]:
            print(
                f"\n{kind} ({len(members)} jobs): threads={threads} mem_mb={mem_mb} "
                f"runtime={runtime} gpu={gpu} -> " + re.sub(r".*?(-p .*?) -D .*", r"\1", call)
            )
        checked[kind] += len(members)
    assert sum(checked.values()) == len([j for j in jobs.values() if not j["local"]])
    # compare_layers asked for 64 threads: capped at the node's CPUs, so it did not pend
    (compare,) = [job for (rule, _), job in jobs.items() if rule == "compare_layers"]
    assert compare["threads"] == node_cpus
    # the workflow profile's default-resources reach the jobs (the SLURM profile sets none)
    defaults = yaml.safe_load((WORKFLOW_PROFILE / "config.yaml").read_text())["default-resources"]
    wrapped = re.search(r"--default-resources ((?:base64//\S+ ?)+)", calls[0]).group(1)
    decoded = {base64.b64decode(arg.removeprefix("base64//")).decode() for arg in wrapped.split()}
    assert {f"{key}={value}" for key, value in defaults.items()} <= decoded


def test_gpu_jobs_alone_go_to_the_gpu_partition():
    """With the profile's partitions.yaml: gpu = 0 -> CPU partition and no --gpus;
    gpu = 1 -> the GPU partition and --gpus=1 (the executor's own selection code)."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    class Job:
        def __init__(self, gpu):
            self.name, self.threads = "extract_features", 2
            self.resources = Resources(gpu=gpu, mem_mb=8000, runtime=240, _cores=2)

    partitions = read_partition_file(SLURM_PROFILE / "partitions.yaml")
    logger = logging.getLogger("slurm-test")
    assert get_best_partition(partitions, Job(0), logger) == "main"
    assert set_gres_string(Job(0)) == ""
    assert get_best_partition(partitions, Job(1), logger) == "gpu"
    assert set_gres_string(Job(1)) == " --gpus=1"


def test_a_group_of_gpu_jobs_asks_for_one_gpu():
    """The profile's one `slot` per submitted job: four GPU extraction jobs grouped into one
    SLURM job are planned in series (as the job step runs them) and the group asks for one
    GPU and one job's memory, the runtimes summed; without it Snakemake would ask for four
    GPUs (its own group resource code, with the profile's settings)."""
    from snakemake.resources import GroupResources, Resources

    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    defaults = yaml.safe_load((WORKFLOW_PROFILE / "config.yaml").read_text())["default-resources"]
    assert profile["set-resource-scopes"] == {"slot": "local"}

    job = SimpleNamespace(
        pipe_group=None,
        resources={"_cores": 2, "gpu": 1, "mem_mb": 8000, "runtime": 240, "slot": defaults["slot"]},
    )

    def group(constraints: list[str]) -> dict:
        limits = Resources.parse(constraints, allow_expressions=False)
        limits["_cores"] = profile["cores"]
        return GroupResources.basic_layered([[job] * 4], limits, run_local=False)

    planned = group([f"{key}={value}" for key, value in profile["resources"].items()])
    assert (planned["gpu"], planned["_cores"], planned["mem_mb"], planned["runtime"]) == (
        1,
        2,
        8000,
        4 * 240,
    )
    assert group([])["gpu"] == 4


def wall_times(local_run, cluster_run) -> float:
    """Print both runs' wall times; returns their ratio."""
    local_s, cluster_s = local_run[1], cluster_run[1]
    print(
        f"\nwall time, scaled-down paper workflow: local {local_s:.0f} s, SLURM {cluster_s:.0f} s "
        f"(x{cluster_s / local_s:.2f}; goal x2)"
    )
    return cluster_s / local_s


def test_metrics_equal_a_local_run(local_run, cluster_run):
    wall_times(local_run, cluster_run)
    local = read_metrics(local_run[0] / METRICS)
    cluster = read_metrics(cluster_run[0] / METRICS)
    assert len(local) > 0
    columns = sorted(local.columns)
    assert local.select(columns).sort(columns).equals(cluster.select(columns).sort(columns))


def test_second_cluster_run_does_nothing(cluster_run, node_cpus):
    workdir = cluster_run[0]
    result, _ = snakemake(
        workdir,
        "--profile",
        str(SLURM_PROFILE),
        "--cores",
        str(node_cpus),
        "--set-threads",
        "compare_layers=64",
    )
    assert result.returncode == 0, result.output[-3000:]
    assert "Nothing to be done" in result.output
    assert not submissions(result.output)


@pytest.mark.skipif(MAX_RATIO is None, reason="set POSTALIGN_CLUSTER_MAX_RATIO to assert it")
def test_cluster_time_against_local(local_run, cluster_run):
    ratio = wall_times(local_run, cluster_run)
    assert math.isfinite(ratio) and ratio <= float(MAX_RATIO)
