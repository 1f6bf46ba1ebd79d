"""``alignfuse bench serve``: start-up time of ``alignfuse serve`` and text-query latency at a large gallery.

* **Start-up**: ``alignfuse serve RUN`` is started as a new process and timed until the page answers
  ``GET /`` with 200 (the trained aligners then still load in a thread), and, in another fresh process,
  until it answers a first text query (aligners and frozen encoders loaded). Peer, in the same run: a
  process that only imports torch and gradio (the floor any Python page over this toolkit pays). CPU
  seconds of each process are printed too, as wall times on a shared machine vary with its load.
* **Text query**: the run's test gallery repeated to ``--gallery`` images (embeddings jittered, so the
  search is over that many distinct rows), served in this process; each query is a test caption,
  encoded live by the run's frozen text encoder and every aligner's text side (where the run can
  rebuild it), searched over all images for every aligner and rendered. Timed over HTTP (Gradio's
  ``/gradio_api/call`` API: POST, then the event stream) against the peer: the same action called
  in-process, without HTTP or rendering.

Goals (issue 16): start-up <= 15 s for a demo run, a text query <= 300 ms at 10,000 images.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HELP = "alignfuse serve: start-up time and text-query latency at 10,000 gallery images (vs in-process search)"
GOALS = {"startup_s": 15.0, "query_ms": 300.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="the run to serve (default: the newest runs/demo-* with an align part)")
    parser.add_argument("--gallery", type=int, default=10_000, help="gallery size for the query latency")
    parser.add_argument("--queries", type=int, default=30, help="timed text queries")
    parser.add_argument("--k", type=int, default=5, help="top-k per aligner")
    parser.add_argument("--startups", type=int, default=2, help="timed start-ups (the best is kept)")


def _default_run() -> Path:
    runs = sorted(Path("runs").glob("demo-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for r in runs:
        if (r / "align" / "results.json").is_file():
            return r
    raise FileNotFoundError("no runs/demo-* with an align part here: run `alignfuse demo` first or pass --run RUN_DIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _time_process(cmd: list[str], ready: Callable[[], bool] | None = None, timeout: float = 300.0
                  ) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds) from starting ``cmd`` until it exits (``ready`` None) or ``ready()`` is true
    (then it is stopped with Ctrl-C)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        if ready is None:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
            return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
        while time.perf_counter() - t0 < timeout:
            if ready():
                return time.perf_counter() - t0, _cpu_seconds(proc.pid)
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{' '.join(cmd)}: not ready after {timeout:.0f} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _page_up(url: str) -> Callable[[], bool]:
    import httpx

    def ready() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


def _answers(url: str, query: str) -> Callable[[], bool]:
    """Ready when the page answers a text query (live where the run can encode new text)."""
    import httpx

    up = _page_up(url)

    def ready() -> bool:
        if not up():
            return False
        with httpx.Client(base_url=url, timeout=300) as client:
            _http_query(client, query, 5)
        return True

    return ready


def _http_query(client: Any, query: str, k: int) -> dict[str, Any]:
    r = client.post("/gradio_api/call/text_to_images", json={"data": [query, k]})
    r.raise_for_status()
    event_id, event = r.json()["event_id"], None
    with client.stream("GET", f"/gradio_api/call/text_to_images/{event_id}") as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"text_to_images failed: {line}")
                return json.loads(line.split(":", 1)[1])[1]
    raise RuntimeError("text_to_images: the event stream ended without a result")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from experiments.serve import actions
    from experiments.serve.app import launch
    from experiments.serve.source import RunSource

    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_dir = Path(args.run) if args.run else _default_run()
    if args.gallery < 1 or args.queries < 1 or args.startups < 1:
        raise ValueError("--gallery, --queries and --startups must be positive")
    # --------------------------------------------------------------- start-up, in fresh processes
    def serve_cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "experiments.cli", "serve", str(run_dir), "--port", str(port)]

    page, first = [], []
    for _ in range(args.startups):
        port = _free_port()
        page.append(_time_process(serve_cmd(port), _page_up(f"http://127.0.0.1:{port}/")))
        port = _free_port()
        first.append(_time_process(serve_cmd(port), _answers(f"http://127.0.0.1:{port}/", "a small red circle")))
    floor = [_time_process([sys.executable, "-c", "import torch, gradio"]) for _ in range(args.startups)]
    page_s, page_cpu = min(page)
    first_s, first_cpu = min(first)
    floor_s, floor_cpu = min(floor)
    # --------------------------------------------------------------- query latency, in this process
    src = RunSource(run_dir)
    src.warm_up()
    big = src.tiled(args.gallery)
    live = [n for n in big.names if big.live(n)]
    queries = [big.gallery.captions[i % len(big.gallery.captions)]
               for i in np.random.default_rng(0).permutation(max(args.queries, len(big.gallery.captions)))[:args.queries]]
    app, url = launch(big, host="127.0.0.1", port=_free_port(), block=False)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for q in queries[:3]:  # warm-up: first requests set up the queue and caches
                _http_query(client, q, args.k)
            http_ms, local_ms = [], []
            for q in queries:
                t0 = time.perf_counter()
                out = _http_query(client, q, args.k)
                http_ms.append(1e3 * (time.perf_counter() - t0))
                if "error" in out:
                    raise RuntimeError(f"query {q!r}: {out['error']}")
                t0 = time.perf_counter()
                actions.text_to_images(big, q, args.k)
                local_ms.append(1e3 * (time.perf_counter() - t0))
    finally:
        app.close()
    figures = {
        "run": str(run_dir), "aligners": big.names, "live_aligners": live, "gallery_images": args.gallery,
        "startup_s": round(page_s, 2), "startup_cpu_s": _round(page_cpu), "import_floor_s": round(floor_s, 2),
        "import_floor_cpu_s": _round(floor_cpu), "first_query_s": round(first_s, 2),
        "first_query_cpu_s": _round(first_cpu),
        "query_http_ms_median": round(float(np.median(http_ms)), 1),
        "query_http_ms_p90": round(float(np.percentile(http_ms, 90)), 1),
        "query_inprocess_ms_median": round(float(np.median(local_ms)), 1), "queries": len(queries), "k": args.k,
        "goals": GOALS,
    }
    _print(figures)
    return figures


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _print(f: dict[str, Any]) -> None:
    ok = lambda v, goal: "met" if v <= goal else "NOT met"  # noqa: E731
    print(f"alignfuse serve on {f['run']}: aligners {', '.join(f['aligners'])} "
          f"(encoded live: {', '.join(f['live_aligners']) or 'none'})")
    print(f"{'measure':<46}{'ours':>10}{'peer':>10}{'ratio':>8}   goal")
    cpu = lambda key: "" if f[key] is None else f" ({f[key]:.1f} CPU s)"  # noqa: E731
    print(f"{'start-up: process start -> page served (s)':<46}{f['startup_s']:>10.2f}{f['import_floor_s']:>10.2f}"
          f"{f['startup_s'] / f['import_floor_s']:>8.2f}   <= {f['goals']['startup_s']:.0f} s: "
          f"{ok(f['startup_s'], f['goals']['startup_s'])}  (peer: python -c 'import torch, gradio'; "
          f"ours{cpu('startup_cpu_s')}, peer{cpu('import_floor_cpu_s')})")
    print(f"{'start-up: process start -> first query (s)':<46}{f['first_query_s']:>10.2f}{f['import_floor_s']:>10.2f}"
          f"{f['first_query_s'] / f['import_floor_s']:>8.2f}   (trained aligners and frozen encoders loaded"
          f"{cpu('first_query_cpu_s')})")
    label = f"text query, {f['gallery_images']:,} images, HTTP (ms)"
    print(f"{label:<46}{f['query_http_ms_median']:>10.1f}{f['query_inprocess_ms_median']:>10.1f}"
          f"{f['query_http_ms_median'] / max(f['query_inprocess_ms_median'], 1e-9):>8.2f}   <= "
          f"{f['goals']['query_ms']:.0f} ms: {ok(f['query_http_ms_median'], f['goals']['query_ms'])}  "
          f"(median of {f['queries']}; p90 {f['query_http_ms_p90']:.1f} ms; peer: the action in-process)")
