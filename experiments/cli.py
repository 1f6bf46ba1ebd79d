"""The ``alignfuse`` command line. Subcommands live in ``experiments/commands/<name>.py``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module name in experiments.commands, in the order shown by --help
# (a module that does not exist yet is skipped, so a command lands as one new file)
COMMAND_MODULES = ["demo", "run", "ask", "serve", "fetch", "retrieval", "extract", "bench", "export_projector"]


def _load_commands():
    mods = []
    for name in COMMAND_MODULES:
        try:
            mods.append(importlib.import_module(f"experiments.commands.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"experiments.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignfuse",
        description="Cross-modal alignment, multimodal fusion and LLM connectors on one Trainer and one evaluator.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # user errors: one clear line, no traceback (use -v for the traceback)
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"alignfuse {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
