# Shared helpers: config validation (before any job), the interpreter, job specs and paths.
# Every path comes from pipeline.layout and every job's spec and inputs from pipeline.jobs,
# the same functions `python -m pipeline <stage> --config ...` uses by hand.
import json
import os
import shlex
import sys
from pathlib import Path

from pipeline import jobs, layout, provenance
from pipeline.config import validate_config
from pipeline.preflight import preflight

# Validate once at parse time: a bad key fails here, before any job runs.
config.update(validate_config(config))

NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"
# The config files of this run as arguments: `python -m pipeline verify` names them in repairs.
CONFIGFILES = " ".join(f"--configfile {shlex.quote(str(p))}" for p in workflow.overwrite_configfiles)

# Jobs run `python -m pipeline` with the interpreter that runs Snakemake (its environment has
# the package, activated or not), unless --sdm conda gives each rule its own environment.
if "conda" not in {str(m).lower() for m in workflow.deployment_settings.deployment_method}:
    bin_dir = shlex.quote(os.path.dirname(sys.executable))
    shell.prefix(f'set -euo pipefail; export PATH={bin_dir}:"$PATH"; ')


wildcard_constraints:
    dataset=NAME,
    split=NAME,
    encoder=NAME,
    vision=NAME,
    text=NAME,
    method=NAME,
    choice="last|best|q[0-9.]+",
    shard="[0-9]+-of-[0-9]+",


def job_of(make):
    """The pipeline.jobs job of a rule's wildcards (``make``: a pipeline.jobs function)."""
    return lambda wildcards: make(config, **dict(wildcards.items()))


def spec_of(make):
    return lambda wildcards: json.dumps(job_of(make)(wildcards).spec, sort_keys=True)


def threads_of(make):
    return lambda wildcards: job_of(make)(wildcards).threads


def inputs_of(make):
    """A job's inputs and its spec record (``pipeline.provenance``): Snakemake compares params
    only with its own records in .snakemake/; the spec record, dated now when the outputs were
    made with another spec, reruns the job without them too (results copied to a new clone, a
    lost .snakemake/). A user's weights file is known by the SHA-256 in the spec
    (``weights_sha256``), so its modification time alone reruns nothing (``ancient``)."""

    def inputs(wildcards):
        job = job_of(make)(wildcards)
        record = layout.spec_record(job.stage, *(str(v) for v in wildcards))
        provenance.request(Path(record), job.spec)
        found = {**job.inputs, "spec_record": record}
        if "weights" in found and "weights_sha256" in job.spec.get("encoder", {}):
            found["weights"] = ancient(found["weights"])
        return found

    return inputs


def incomplete_runs(wildcards):
    """Runs an existing ``runs.json`` lists whose ``done.json`` is gone. As a param it is [] when
    the job runs, so a run deleted later changes it and Snakemake reruns the job (which, run
    again rather than after a kill, refits its runs)."""
    runs_json = Path(layout.aligner_runs(**dict(wildcards.items())))
    if not runs_json.is_file():
        return []
    names = json.loads(runs_json.read_text())["runs"]
    return [name for name in names if not (runs_json.parent / name / "done.json").is_file()]


def cli_paths(files):
    """Snakemake's named inputs or outputs as NAME=PATH arguments, quoted for the shell."""
    tokens = []
    for name in files.keys():
        value = files[name]
        paths = [value] if isinstance(value, str) else list(value)
        tokens += [shlex.quote(f"{name}={path}") for path in paths]
    return " ".join(tokens)


def wants_gpu(device):
    return int(device.startswith("cuda"))


def gpu_unless_sharded(wildcards):
    """An extraction's GPU, unless its split is sharded: then its shard jobs have the GPUs
    and it only completes the store or token set."""
    unsharded = jobs.extract_shards(config, wildcards.split) == 1
    return wants_gpu(config["runtime"]["device"]) * unsharded
