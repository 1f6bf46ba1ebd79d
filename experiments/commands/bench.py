"""``alignfuse bench NAME``: speed/memory benchmarks that print ratios against a peer run in the same process.

Each benchmark lives in ``experiments/bench/<name>.py`` and defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> dict`` (the measured figures; the module prints its own table).
"""
from __future__ import annotations

import argparse
import importlib
import json

NAME = "bench"
HELP = "run a benchmark (retrieval, cca, clip, datagen, features) and print ratios against its peer"
BENCHMARKS = ["retrieval", "cca", "clip", "datagen", "features", "bridge", "serve"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    for name in BENCHMARKS:
        try:
            mod = importlib.import_module(f"experiments.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"experiments.bench.{name}":
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--json", metavar="OUT.json", default=None, help="also write the figures to this JSON file")
        p.set_defaults(_bench=mod.run)


def run(args: argparse.Namespace) -> int:
    figures = args._bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0
