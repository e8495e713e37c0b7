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


@command(
    "similarity",
    SPEC,
    arg("--vision-store", type=Path, required=True),
    arg("--text-store", type=Path, required=True),
    arg("--train-dir", type=Path, required=True, help="prepared dataset of the training split"),
    arg("--train-split", required=True),
    arg("--out", type=Path, required=True, help="folder for the table, heatmaps, layers.json"),
)
def _similarity(args: argparse.Namespace) -> None:
    from pipeline.similarity.stage import run_similarity

    run_similarity(
        vision_store=args.vision_store,
        text_store=args.text_store,
        train_dir=args.train_dir,
        train_split=args.train_split,
        spec=args.spec["similarity"],
        grid=args.spec["grid"],
        out_dir=args.out,
    )


@command(
    "align",
    SPEC,
    arg("--method", required=True, help="run name under align.methods"),
    arg("--layer-choice", required=True, help="last, best or q<quantile>"),
    arg("--layers", type=Path, required=True, help="layers.json of the similarity stage"),
    arg(
        "--stores",
        type=json.loads,
        required=True,
        help="JSON: vision_train, text_train, vision_val, text_val store paths",
    ),
    arg("--train", nargs=2, required=True, metavar=("DATASET_DIR", "SPLIT")),
    arg("--val", nargs=2, required=True, metavar=("DATASET_DIR", "SPLIT")),
    arg("--out", type=Path, required=True, help="folder of the grid's runs"),
)
def _align(args: argparse.Namespace) -> None:
    from pipeline.align.stage import run_align

    run_align(
        method_name=args.method,
        method_spec=args.spec["method"],
        layer_choice=args.layer_choice,
        grid=args.spec["grid"],
        stores={role: Path(path) for role, path in args.stores.items()},
        train=(Path(args.train[0]), args.train[1]),
        val=(Path(args.val[0]), args.val[1]),
        layers_json=args.layers,
        out_dir=args.out,
    )


@command(
    "evaluate",
    SPEC,
    arg("--aligners", type=Path, required=True, help="folder with runs.json of the align job"),
    arg("--out", type=Path, required=True, help="the job's metrics, Parquet"),
)
def _evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluate.stage import EvalSplit, run_evaluate

    splits = [EvalSplit.from_dict(split) for split in args.spec["splits"]]
    run_evaluate(aligner_dir=args.aligners, splits=splits, out=args.out)


@command(
    "aggregate",
    arg("--evaluations", type=Path, nargs="+", required=True),
    arg("--similarities", type=Path, nargs="+", required=True),
    arg("--tables", type=Path, required=True, help="folder for metrics/summary.parquet"),
    arg("--plots", type=Path, required=True, help="folder for the figures"),
)
def _aggregate(args: argparse.Namespace) -> None:
    from pipeline.evaluate.aggregate import run_aggregate

    run_aggregate(
        evaluations=args.evaluations,
        similarities=args.similarities,
        tables_dir=args.tables,
        plots_dir=args.plots,
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
