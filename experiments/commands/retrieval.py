"""``alignfuse retrieval``: exact image↔text retrieval metrics from embedding files.

    alignfuse retrieval --image-emb I.npy --text-emb T.npy --text-to-image M.npy \\
        [--ks 1,5,10] [--no-normalize] [--map] [--bootstrap N] [--ties expected] [--json OUT.json]

``M.npy`` holds, for each row of ``T.npy``, the row of its image in ``I.npy``. Prints a table (with
each direction's share of tied queries) and, with ``--json``, writes
``{"image_to_text": {...}, "text_to_image": {...}, "rsum": ..., "ties": ...}`` to ``OUT.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "retrieval"
HELP = "exact image<->text retrieval metrics (R@K, median/mean rank, rsum, mAP) from .npy embeddings"


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers, got {text!r}")
    return ks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-emb", required=True, metavar="I.npy", help="image embeddings [N_images, D]")
    parser.add_argument("--text-emb", required=True, metavar="T.npy", help="text embeddings [N_texts, D]")
    parser.add_argument("--text-to-image", required=True, metavar="M.npy",
                        help="integer [N_texts]: the image row of each text row")
    parser.add_argument("--ks", type=_parse_ks, default="1,5,10", metavar="K,K,...", help="recall cut-offs")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="score raw inner products instead of cosine similarities "
                             "(normalize=%(default)s unless given)")
    parser.add_argument("--map", dest="with_map", action="store_true",
                        help="also compute mAP (one more compare per caption slot)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="bootstrap replicates for confidence intervals (0: none)")
    parser.add_argument("--ci", type=float, default=0.95, help="confidence level of the bootstrap intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="caption rows per score block; None: as many as fit --memory-mib")
    parser.add_argument("--memory-mib", type=float, default=256.0, help="memory budget of one score block")
    parser.add_argument("--ties", choices=("expected", "pessimistic", "optimistic"), default="expected",
                        help="how a true item tied with others is ranked: expected (random tie-break, the "
                             "default: a collapsed model scores chance), pessimistic (last) or optimistic "
                             "(first, the gameable old convention)")
    parser.add_argument("--degenerate", choices=("error", "tie"), default="error",
                        help="zero-norm rows: stop with an error naming the row (default) or score them as ties")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="precision of the first-pass GEMM (ranks are exact float64 ones either way; "
                             "auto: bf16 where it is faster)")
    parser.add_argument("--json", default=None, metavar="OUT.json",
                        help="also write the metrics as JSON here (default: only print them)")


def _load(path: str, flag: str):
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{flag} {path}: not a readable .npy array ({e})") from None


def format_table(metrics: dict, ks: tuple[int, ...]) -> str:
    """A small text table of the two directions (with CI rows after a bootstrap) plus rsum."""
    keys = [f"R@{k}" for k in ks] + ["median_rank", "mean_rank"]
    heads = [f"R@{k}" for k in ks] + ["medR", "meanR"]
    if "tied_fraction" in metrics["image_to_text"]:
        keys.append("tied_fraction")
        heads.append("tied")
    if "mAP" in metrics["image_to_text"]:
        keys.append("mAP")
        heads.append("mAP")
    with_ci = "rsum_ci_low" in metrics
    w = 15 if with_ci else 9
    lines = [f"{'direction':<15}" + "".join(f"{h:>{w}}" for h in heads)]
    for name in ("image_to_text", "text_to_image"):
        m = metrics[name]
        lines.append(f"{name:<15}" + "".join(f"{m[k]:>{w}.2f}" for k in keys))
        if with_ci:
            label = f"  {metrics['ci']:.0%} CI"
            lines.append(f"{label:<15}" + "".join(
                (f"{m[k + '_ci_low']:.1f}-{m[k + '_ci_high']:.1f}" if k + "_ci_low" in m else "").rjust(w)
                for k in keys))
    rsum = f"rsum {metrics['rsum']:.2f}" + (f"  (ties: {metrics['ties']})" if "ties" in metrics else "")
    if with_ci:
        rsum += f"  ({metrics['ci']:.0%} CI {metrics['rsum_ci_low']:.2f}-{metrics['rsum_ci_high']:.2f})"
    lines.append(rsum)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    image_emb = _load(args.image_emb, "--image-emb")
    text_emb = _load(args.text_emb, "--text-emb")
    text_to_image = _load(args.text_to_image, "--text-to-image")
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if not 0.0 < args.ci < 1.0:
        raise ValueError(f"--ci must be in (0, 1), got {args.ci}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be positive, got {args.chunk_size}")
    if args.memory_mib <= 0:
        raise ValueError(f"--memory-mib must be positive, got {args.memory_mib}")
    from experiments.retrieval import retrieval_metrics

    names = (f"--image-emb {args.image_emb}", f"--text-emb {args.text_emb}", f"--text-to-image {args.text_to_image}")
    out = None
    if args.json is not None:
        out = Path(args.json)
        if not out.parent.exists():
            raise FileNotFoundError(f"--json {args.json}: directory {out.parent} does not exist")
    metrics = retrieval_metrics(
        image_emb, text_emb, text_to_image, args.ks, normalize=args.normalize, with_map=args.with_map,
        ties=args.ties, degenerate=args.degenerate, precision=args.precision,
        bootstrap=args.bootstrap, ci=args.ci, seed=args.seed, chunk_size=args.chunk_size,
        memory_budget=int(args.memory_mib * 2**20), input_names=names,
    )
    print(format_table(metrics, args.ks))
    if out is not None:
        from align.weights import write_file_atomically

        write_file_atomically(out, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
        print(f"wrote {out}")
    return 0
