"""Command line of the pipeline: ``python -m pipeline <stage> ...``.

Snakemake rules call these commands with explicit arguments (each job's slice of the
config as JSON), so every stage also runs by hand. ``--spec`` takes a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {}


def command(name: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]):
    """Register a subcommand with its arguments."""

    def register(function: Callable[[argparse.Namespace], None]):
        COMMANDS[name] = function
        function.arguments = arguments  # type: ignore[attr-defined]
        return function

    return register


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


SPEC = arg("--spec", type=json.loads, required=True, help="the job's configuration, as JSON")


@command(
    "validate",
    arg("config", type=Path, help="config file"),
)
def _validate(args: argparse.Namespace) -> None:
    from pipeline.config import load_config

    load_config(args.config)
    print(f"{args.config}: valid")


@command(
    "prepare-data",
    arg("--name", required=True, help="dataset name (key under 'datasets')"),
    SPEC,
    arg("--out", type=Path, required=True, help="dataset folder, results/datasets/<name>"),
)
def _prepare_data(args: argparse.Namespace) -> None:
    from pipeline.data import prepare_dataset

    prepare_dataset(args.name, args.spec, args.out)


@command(
    "extract",
    arg("--encoder", required=True, help="encoder name (key under 'encoders')"),
    SPEC,
    arg("--dataset-dir", type=Path, required=True, help="prepared dataset folder"),
    arg("--split", required=True, help="split name, or 'prompts' for zero-shot prompts"),
    arg("--out", type=Path, required=True, help="the feature store, <encoder>.zarr"),
)
def _extract(args: argparse.Namespace) -> None:
    from pipeline.extract import extract

    extract(
        encoder_name=args.encoder,
        encoder_spec=args.spec["encoder"],
        runtime=args.spec["runtime"],
        dataset_dir=args.dataset_dir,
        split=args.split,
        out=args.out,
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subcommands = top.add_subparsers(dest="command", required=True)
    for name, function in COMMANDS.items():
        sub = subcommands.add_parser(name, help=(function.__doc__ or "").strip() or None)
        for flags, options in function.arguments:  # type: ignore[attr-defined]
            sub.add_argument(*flags, **options)
        sub.set_defaults(run=function)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.run(args)
