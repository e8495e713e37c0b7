# Shared helpers: config validation (before any job), the interpreter, job specs and paths.
# Every path comes from pipeline.layout and every job's spec and inputs from pipeline.jobs,
# the same functions `python -m pipeline <stage> --config ...` uses by hand.
import json
import shlex
import sys

from pipeline import jobs, layout
from pipeline.config import validate_config

# Validate once at parse time: a bad key fails here, before any job runs.
config.update(validate_config(config))

NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"
# Jobs run the interpreter that runs Snakemake (its environment has the package), unless
# --sdm conda gives each rule its own environment, whose `python` is first on PATH.
USES_CONDA = "conda" in {str(m).lower() for m in workflow.deployment_settings.deployment_method}
PYTHON = "python" if USES_CONDA else shlex.quote(sys.executable)
STAGE = f"{PYTHON} -m pipeline"
EXTRACT_OPTIONS = json.dumps(jobs.extract_options(config), sort_keys=True)


wildcard_constraints:
    dataset=NAME,
    split=NAME,
    encoder=NAME,
    vision=NAME,
    text=NAME,
    method=NAME,
    choice="last|best|q[0-9.]+",


def job_of(make):
    """The pipeline.jobs job of a rule's wildcards (``make``: a pipeline.jobs function)."""
    return lambda wildcards: make(config, **dict(wildcards.items()))


def spec_of(make):
    return lambda wildcards: json.dumps(job_of(make)(wildcards).spec, sort_keys=True)


def inputs_of(make):
    return lambda wildcards: job_of(make)(wildcards).inputs


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
