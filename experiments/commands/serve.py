"""``alignfuse serve RUN_DIR``: a run's retrieval, binding probe and ask-the-image as a local web page.

    alignfuse demo --out runs/demo
    alignfuse serve runs/demo            # then open http://127.0.0.1:7860

Serves the demo's out dir, an align run or a bridge run (Gradio). Binds 127.0.0.1 unless ``--host``
says otherwise; Ctrl+C stops it.
"""
from __future__ import annotations

import argparse
import logging
import time

NAME = "serve"
HELP = "serve a run's text->image and image->caption retrieval, binding probe and ask-the-image as a web page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a demo out dir, an align run or a bridge run")
    parser.add_argument("--port", type=int, default=7860, help="port (0: the first free port from 7860)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 exposes the page to the network)")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="load the frozen encoders on the first live query instead of right after start-up")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per internal health check otherwise
    from experiments.serve.app import launch
    from experiments.serve.source import RunSource

    src = RunSource(args.run_dir, warm=args.warm, background=True)
    try:
        app, url = launch(src, host=args.host, port=args.port or None, block=False)
    except OSError as e:
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {e} (try --port 0)") from None
    print(f"serving {src.run_dir} at {url} (ready in {time.perf_counter() - t0:.1f} s; Ctrl+C stops)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
