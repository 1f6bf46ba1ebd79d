"""``alignfuse ask RUN_DIR --image PATH "question"``: answer questions about images with a trained bridge model."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "ask"
HELP = "ask a trained bridge model (demo output or bridge run dir) a question about an image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a bridge run's out_dir or the demo's output directory")
    parser.add_argument("question", nargs="?", default=None, help="the question (with --image)")
    parser.add_argument("--image", default=None, metavar="PATH", help="an image file (PNG, JPEG, ...)")
    parser.add_argument("--batch", default=None, metavar="FILE.jsonl",
                        help='many questions, one model load: lines {"image": PATH, "question": TEXT}; prints one '
                             'JSON line per input with an added "answer"')
    parser.add_argument("--max-new-tokens", type=int, default=12)
    # `ask RUN_DIR --image PATH "question"`: the question comes after an option, which plain argparse does
    # not give to a positional; intermixed parsing does
    plain = parser.parse_known_args

    def intermixed(args=None, namespace=None):
        parser.parse_known_args = plain  # parse_known_intermixed_args calls it twice internally
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = intermixed

    parser.parse_known_args = intermixed  # type: ignore[method-assign]


def _batch_lines(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("image"), str) \
                        or not isinstance(row.get("question"), str):
                    raise ValueError(f'{path}:{n}: expected {{"image": PATH, "question": TEXT}}, got {line.strip()[:80]}')
                if not row["question"].strip():
                    raise ValueError(f"{path}:{n}: empty question")
                rows.append(row)
    except FileNotFoundError:
        raise FileNotFoundError(f"batch file {path} does not exist") from None
    return rows


def run(args: argparse.Namespace) -> int:
    from experiments.ask import ask, find_model_dir, load_bridge, read_image

    if args.batch is None:
        if args.image is None or args.question is None:
            raise ValueError("give --image PATH and a question, or --batch FILE.jsonl")
        if not args.question.strip():
            raise ValueError("empty question")
        find_model_dir(args.run_dir)  # a missing run dir fails before the image or the model are read
        image = read_image(args.image)
        print(ask(load_bridge(args.run_dir), image, args.question, args.max_new_tokens))
        return 0
    rows = _batch_lines(args.batch)
    find_model_dir(args.run_dir)
    images = [read_image(r["image"]) for r in rows]
    model = load_bridge(args.run_dir)
    for row, image in zip(rows, images):
        print(json.dumps({**row, "answer": ask(model, image, row["question"], args.max_new_tokens)}))
        sys.stdout.flush()
    return 0
