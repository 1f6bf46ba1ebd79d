"""``alignfuse run CONFIG.yaml [key=value ...]``: run any experiment config with dotted overrides.

Every value is validated before any work (``--dry-run`` stops there and prints the full config). Runs resume:
rerunning the same command continues an interrupted run from its checkpoints under ``out_dir`` and keeps the
(part, seed) units already finished. Ctrl-C stops at the next training step with a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys

NAME = "run"
HELP = "run an experiment config (align, fusion or bridge) with dotted key=value overrides; reruns resume"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config file, or the name of a bundled one (e.g. align_shapesworld)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, values parsed as YAML: train.max_steps=100 seeds=[0,1] out_dir=runs/x")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print it, run nothing")


def run(args: argparse.Namespace) -> int:
    from experiments.config import apply_overrides, config_path, read_yaml, with_overrides
    from experiments.runners import runner_module

    path = config_path(args.config)
    raw = read_yaml(path)
    mod = runner_module(apply_overrides(raw, args.overrides).get("experiment", ""))
    config_cls = getattr(mod, "Config", None)
    if hasattr(config_cls, "model_fields"):  # a pydantic RunConfig: its override rules (a new data source)
        raw = with_overrides(config_cls, raw, args.overrides)
    else:
        raw = apply_overrides(raw, args.overrides)
    cfg = mod.load(raw, where=path.name)  # validates every key and name before any work
    if args.dry_run:
        print(json.dumps(mod.to_dict(cfg) if hasattr(mod, "to_dict") else raw, indent=2, default=str))
        return 0
    try:
        results = mod.run(cfg)
    except KeyboardInterrupt:
        out = getattr(cfg, "out_dir", None)
        print(f"\nalignfuse run: interrupted; checkpoints are in {out}: run the same command again to resume",
              file=sys.stderr)
        return 130
    print(mod.format_results(results))
    return 0
