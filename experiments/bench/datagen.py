"""``alignfuse bench datagen``: ShapesWorld generation speed (cache disabled); peer: reading the same data from a cache.

Prints scenes/s, wall and CPU seconds for generation (one process), then (unless ``--no-cache-peer``) the time
to write the data to a temporary cache directory, to read it back fully (no memory map) and to open it as a
cache hit does (text parsed, arrays memory-mapped), and the ratio generation / full cache read.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

HELP = "time ShapesWorld generation (cache disabled) against reading the same data back from its cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-scenes", type=int, default=10000, help="number of scenes to generate")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--no-cache-peer", action="store_true", help="skip the cache write/read peer")


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(args: argparse.Namespace) -> dict:
    from experiments.data.shapesworld import ShapesWorld, load_shapesworld

    t0, c0 = time.perf_counter(), time.process_time()
    data = load_shapesworld(n_scenes=args.n_scenes, image_size=args.image_size, seed=args.seed, use_cache=False)
    gen_s, gen_cpu = time.perf_counter() - t0, time.process_time() - c0
    figures: dict = {
        "n_scenes": args.n_scenes, "image_size": args.image_size,
        "generate_s": round(gen_s, 3), "generate_cpu_s": round(gen_cpu, 3),
        "generate_scenes_per_s": round(args.n_scenes / gen_s, 1),
    }
    rows = [("generate (no cache)", gen_s, args.n_scenes / gen_s)]
    if not args.no_cache_peer:
        with tempfile.TemporaryDirectory(prefix="alignfuse-datagen-") as tmp:
            path = Path(tmp) / "shapesworld"
            t0 = time.perf_counter()
            data.save(path)
            save_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ShapesWorld.load(path, mmap=False)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ShapesWorld.load(path)  # what load_shapesworld does on a cache hit: text parsed, arrays mapped
            open_s = time.perf_counter() - t0
            figures.update(cache_write_s=round(save_s, 3), cache_read_s=round(load_s, 3), cache_open_s=round(open_s, 3),
                           cache_mb=round(_dir_mb(path), 1), generate_over_cache_read=round(gen_s / load_s, 2))
        rows += [("cache write", save_s, args.n_scenes / save_s), ("cache read (full)", load_s, args.n_scenes / load_s),
                 ("cache open (mmap)", open_s, args.n_scenes / open_s)]

    print(f"ShapesWorld datagen: {args.n_scenes} scenes at {args.image_size} px")
    print(f"{'step':<22}{'seconds':>10}{'scenes/s':>12}")
    for name, sec, rate in rows:
        print(f"{name:<22}{sec:>10.2f}{rate:>12.0f}")
    print(f"generation CPU time: {gen_cpu:.2f} s (wall above is larger when other processes share the cores)")
    if "cache_read_s" in figures:
        print(f"generation / cache read: {figures['generate_over_cache_read']:.2f}x  (cache {figures['cache_mb']} MB)")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
