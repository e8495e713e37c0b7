"""Command line of the pipeline: ``python -m pipeline <stage> ...``, one shape for every stage.

Each stage (named like its Snakemake rule) takes its job in one of two equivalent forms:

- what a rule passes: ``--spec JSON`` (the job's slice of the config), ``--in NAME=PATH ...``
  (the rule's named inputs), ``--out NAME=PATH ...`` (its declared outputs) and
  ``--threads N`` (the CPU threads Snakemake gave the job);
- by hand: ``--config config.yaml`` plus the job's wildcards (``--pair vit_tiny/minilm
  --method linear --choice best``), from which ``pipeline.jobs`` derives the same spec and
  paths a rule would.

A NAME given several times is a list (the aggregate stage's many evaluation tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import jobs, provenance


@dataclass(frozen=True)
class Stage:
    """A subcommand: what it is about and the wildcards that name one job; its runner is
    ``pipeline.stages.<name>:run``."""

    help: str
    wildcards: tuple[str, ...]
    job: Callable[..., jobs.Job]
    alias: str | None = None


STAGES: dict[str, Stage] = {
    "prepare_dataset": Stage(
        "materialise one dataset: manifests, captions, tasks, prompts (and synthetic images)",
        ("dataset",),
        jobs.prepare_dataset,
        "prepare",
    ),
    "pretrain_encoder": Stage(
        "train a timm encoder self-supervised on unpaired synthetic images (its pretrain block)",
        ("encoder",),
        jobs.pretrain_encoder,
        "pretrain",
    ),
    "extract_features": Stage(
        "pool every layer of one encoder over one dataset split into a Zarr feature store",
        ("dataset", "split", "encoder"),
        jobs.extract_features,
        "extract",
    ),
    "extract_features_shard": Stage(
        "one shard of a feature store (runtime.extract_shards > 1): a run of its blocks",
        ("dataset", "split", "encoder", "shard"),
        jobs.extract_features_shard,
        "extract_shard",
    ),
    "extract_tokens": Stage(
        "store every token of the chosen layers of one encoder over one dataset split",
        ("dataset", "split", "encoder"),
        jobs.extract_tokens,
        "tokens",
    ),
    "extract_tokens_shard": Stage(
        "one shard of a token set (runtime.extract_shards > 1): a run of each store's blocks",
        ("dataset", "split", "encoder", "shard"),
        jobs.extract_tokens_shard,
        "tokens_shard",
    ),
    "compare_layers": Stage(
        "score every (vision layer, text layer) pair, draw heatmaps, choose the layers",
        ("pair",),
        jobs.compare_layers,
        "similarity",
    ),
    "sweep_layers": Stage(
        "fit the sweep method at every layer pair of one encoder pair and score each",
        ("pair",),
        jobs.sweep_layers,
        "sweep",
    ),
    "fit_aligners": Stage(
        "fit one method at one layer choice over the whole (n_pairs x seeds) grid",
        ("pair", "method", "choice"),
        jobs.fit_aligners,
        "align",
    ),
    "evaluate_aligners": Stage(
        "zero-shot classification, retrieval and segmentation of every run of one align job",
        ("pair", "method", "choice"),
        jobs.evaluate_aligners,
        "evaluate",
    ),
    "aggregate": Stage(
        "concatenate the metrics tables, summarise over seeds, draw the plots",
        (),
        jobs.aggregate,
        "tables",
    ),
    "publish": Stage(
        "copy the aggregate's staged tables and plots to results/tables and results/plots",
        (),
        jobs.publish,
    ),
}

WILDCARD_HELP = {
    "dataset": "dataset name (a key under 'datasets')",
    "split": "split name, or 'prompts' for a dataset's zero-shot prompts",
    "encoder": "encoder name (a key under 'encoders')",
    "shard": "shard of a feature store or token set as K-of-N (N: runtime.extract_shards)",
    "pair": "encoder pair as VISION/TEXT (one of experiment.pairs)",
    "method": "method name (a key under 'align.methods')",
    "choice": "layer choice: last, best or q<quantile>",
}


def named_paths(items: list[str] | None) -> dict[str, str | list[str]]:
    """``["a=x", "b=y", "b=z"]`` -> ``{"a": "x", "b": ["y", "z"]}``."""
    paths: dict[str, Any] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        if name in paths:
            previous = paths[name]
            paths[name] = [*previous, path] if isinstance(previous, list) else [previous, path]
        else:
            paths[name] = path
    return paths


def job_from_args(name: str, stage: Stage, args: argparse.Namespace) -> jobs.Job:
    """The job a rule would run, from --spec/--in/--out or from --config and the wildcards."""
    if args.config is None:
        if args.spec is None or not args.outputs:
            raise SystemExit(f"{name}: give --spec, --in and --out, or --config and the wildcards")
        inputs, outputs = named_paths(args.inputs), named_paths(args.outputs)
        return jobs.Job(name, args.spec, inputs, outputs, args.threads)
    from pipeline.config import load_config

    config = load_config(args.config)
    values = []
    for wildcard in stage.wildcards:
        value = getattr(args, wildcard)
        if value is None:
            raise SystemExit(f"{name} --config needs --{wildcard} ({WILDCARD_HELP[wildcard]})")
        if wildcard == "pair":
            vision, sep, text = value.partition("/")
            if (vision, text) not in jobs.encoder_pairs(config) or not sep:
                raise SystemExit(f"--pair {value}: not one of {jobs.encoder_pairs(config)}")
            values += [vision, text]
        else:
            values.append(value)
    try:
        job = stage.job(config, *values)
    except KeyError as err:
        raise SystemExit(f"{name}: {err.args[0]!r} is not defined in {args.config}") from None
    return job if args.threads is None else dataclasses.replace(job, threads=args.threads)


def run_stage(name: str, args: argparse.Namespace) -> None:
    stage = STAGES[name]
    job = job_from_args(name, stage, args)
    importlib.import_module(f"pipeline.stages.{name}").run(job)
    if record := job.inputs.get("spec_record"):  # run by a rule: say what made its outputs
        provenance.record_made(Path(str(record)), job.spec)


def validate(args: argparse.Namespace) -> None:
    from pipeline.config import load_config

    load_config(args.config)
    print(f"{args.config}: valid")


def verify(args: argparse.Namespace) -> None:
    from pipeline.verify import print_report, verify_results, verify_tables

    check = verify_tables if args.tables else verify_results
    raise SystemExit(print_report(check(args.results, args.configfile)))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = top.add_subparsers(dest="command", required=True, metavar="STAGE")
    check = commands.add_parser("validate", help="validate a config file and say so")
    check.add_argument("config", type=Path, help="config file (YAML)")
    check.set_defaults(run=validate)
    audit = commands.add_parser(
        "verify", help="check every feature store and aligner run; print what is damaged"
    )
    audit.add_argument("--results", type=Path, default=Path("results"), help="results folder")
    audit.add_argument(
        "--configfile",
        type=Path,
        action="append",
        help="the config file(s) the results were made with: named in the repair commands",
    )
    audit.add_argument(
        "--tables",
        action="store_true",
        help="check only the tables under results/tables (what the HTML report embeds)",
    )
    audit.set_defaults(run=verify)
    for name, stage in STAGES.items():
        aliases = [stage.alias] if stage.alias else []
        sub = commands.add_parser(name, aliases=aliases, help=stage.help)
        sub.add_argument("--spec", type=json.loads, help="the job's slice of the config, as JSON")
        sub.add_argument("--in", dest="inputs", nargs="*", metavar="NAME=PATH", help="inputs")
        sub.add_argument("--out", dest="outputs", nargs="*", metavar="NAME=PATH", help="outputs")
        sub.add_argument("--threads", type=int, help="CPU threads the job may use")
        sub.add_argument("--config", type=Path, help="derive the job from this config file")
        for wildcard in stage.wildcards:
            sub.add_argument(f"--{wildcard}", help=WILDCARD_HELP[wildcard])
        sub.set_defaults(run=lambda args, name=name: run_stage(name, args))
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.run(args)
