"""``alignfuse demo``: the README's first command — the whole toolkit on the embedded data."""
from __future__ import annotations

import argparse
import time

NAME = "demo"
HELP = ("generate ShapesWorld, cache frozen features, compare aligners, fusion strategies and seeded vs random "
        "LLM connectors; write results.json, report.md with plots and a LLaVA mm_projector.bin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default: runs/demo-<timestamp>)")
    parser.add_argument("--full", action="store_true",
                        help="the bundled configs' heavier settings (3 seeds, more scenes and steps; tens of minutes "
                             "on CPU) instead of the ~10-minute demo settings")
    parser.add_argument("--parts", default="align,fusion,bridge",
                        help="comma-separated subset of the parts to run: align, fusion, bridge")


def run(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - {"align", "fusion", "bridge"})
    if unknown:
        raise ValueError(f"unknown demo part(s) {', '.join(unknown)}; choose from align, fusion, bridge")
    try:
        results = run_demo(out, full=args.full, parts=parts)
    except KeyboardInterrupt:
        import sys

        print(f"\nalignfuse demo: interrupted; run `alignfuse demo --out {out}` to resume", file=sys.stderr)
        return 130
    print(f"\nalignfuse demo finished in {results['seconds']['total']:.0f} s")
    print(f"  report:  {out}/report.md")
    print(f"  results: {out}/results.json")
    if results.get("mm_projector"):
        print(f"  LLaVA projector: {out}/{results['mm_projector']['mm_projector']}")
    return 0
