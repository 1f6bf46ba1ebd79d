"""``alignfuse bench retrieval``: the exact evaluator against its physical limit and two peers.

On one synthetic data set (``n_images`` × ``captions_per_image`` captions, ``dim``-d, captions in
shuffled order, each caption its image plus Gaussian noise so ranks are non-trivial):

1. **speed vs one bare float32 matmul pass**: wall time of
   :func:`experiments.retrieval.retrieval_metrics` (both directions, exact float64 ranks with
   expected ties, default metrics, validation and normalisation included) over the wall time of
   ``torch.mm(T_chunk, I.T)`` in float32 over the same blocks; the pass is timed before and after
   the evaluator and the mean is used, which halves the effect of drifting load. Goal: ≤ 0.7×,
   reachable only where the bf16 filter is faster than float32 (AMX / AVX-512 bf16 CPUs, CUDA):
   the evaluator's first pass is itself one GEMM, in bf16 there and in float32 elsewhere.
   **Counting the CLI's start-up**: plus the wall time of ``alignfuse retrieval`` on a tiny data
   set in a fresh process (interpreter, imports, loading, printing). Goal: ≤ 0.85×.
2. **speed vs faiss**: ``IndexFlatIP`` top-10 search in both directions (images indexing the
   captions' queries and the other way round). Goal: faiss time ≥ 3× ours.
3. **peak memory vs open_clip**: ``open_clip_train.train.get_clip_metrics`` builds the full
   logits matrix and argsorts it; it assumes 1:1 pairs, so both it and our evaluator run on the
   1:1 subset (each image with its first caption), each in a fresh subprocess, and the figure is
   the peak resident set size during the call minus the resident size just before it (Linux
   ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; ``ru_maxrss`` otherwise).
   Goal: ours ≤ 1/10 of the peer's. Our peak on the full data is measured the same way in-process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HELP = ("exact retrieval evaluator vs one bare float32 matmul pass (goal <= 0.7x, <= 0.85x with the CLI's "
        "start-up), faiss IndexFlatIP top-10 (goal >= 3x faster) and open_clip's get_clip_metrics peak memory "
        "(goal <= 1/10)")

GOAL_MATMUL_RATIO = 0.7
GOAL_CLI_RATIO = 0.85
GOAL_FAISS_SPEEDUP = 3.0
GOAL_MEMORY_RATIO = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-images", type=int, default=20000, help="images (and 1:1 pairs of the memory probe)")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions per image, shuffled")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--noise", type=float, default=6.0,
                        help="caption = image + noise * N(0, 1) per dimension, before normalising")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--memory-mib", type=float, default=256.0, help="the evaluator's score-block budget")
    parser.add_argument("--map", dest="with_map", action="store_true", help="also time the evaluator with mAP")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the evaluator's filter GEMM (auto: bf16 where it is faster than float32)")
    parser.add_argument("--skip-faiss", action="store_true", help="skip the faiss IndexFlatIP timing")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the peak-memory probes (the peer needs ~10 GiB at the default size)")


def make_data(n_images: int, captions_per_image: int, dim: int, noise: float = 6.0,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm image [N, D] and caption [N*c, D] float32 embeddings in shuffled caption order,
    and ``text_to_image`` [N*c]."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim), dtype=np.float32)
    t2i = rng.permutation(np.repeat(np.arange(n_images), captions_per_image))
    texts = np.empty((len(t2i), dim), dtype=np.float32)
    for s in range(0, len(t2i), 65536):  # in blocks: keeps the generator's temporaries small
        e = min(len(t2i), s + 65536)
        texts[s:e] = images[t2i[s:e]] + noise * rng.standard_normal((e - s, dim), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts, t2i


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Context manager: ``.peak_mib`` = peak resident memory during the block minus resident memory at entry."""

    def __enter__(self) -> "PeakRSS":
        import gc
        import resource

        gc.collect()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.method = "ru_maxrss"
        self._start_kib = _status_kib("VmRSS")
        self._start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self._start_kib is None:  # no /proc: the delta of the high-water mark, a lower bound
            self.method = "ru_maxrss"
            self._start_kib = self._start_max
        return self

    def __exit__(self, *exc) -> None:
        import resource

        peak = _status_kib("VmHWM") if self.method == "VmHWM" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib = max(0, peak - self._start_kib) / 1024


_CHILD = r"""
import json, sys, time
import numpy as np
which, folder, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
images = np.load(folder + "/images.npy")
texts = np.load(folder + "/texts.npy")
import torch
from experiments.bench.retrieval import PeakRSS
source = None
if which == "peer":
    try:
        from open_clip_train.train import get_clip_metrics
        source = "open_clip_train.train.get_clip_metrics"
    except Exception:  # not installed: the same computation, copied from open_clip_train/train.py
        source = "inline copy of open_clip_train.train.get_clip_metrics"

        def get_clip_metrics(image_features, text_features, logit_scale):
            metrics = {}
            logits_per_image = (logit_scale * image_features @ text_features.t()).detach().cpu()
            logits_per_text = logits_per_image.t().detach().cpu()
            logits = {"image_to_text": logits_per_image, "text_to_image": logits_per_text}
            ground_truth = torch.arange(len(text_features)).view(-1, 1)
            for name, logit in logits.items():
                ranking = torch.argsort(logit, descending=True)
                preds = torch.where(ranking == ground_truth)[1]
                preds = preds.detach().cpu().numpy()
                metrics[f"{name}_mean_rank"] = preds.mean() + 1
                metrics[f"{name}_median_rank"] = np.floor(np.median(preds)) + 1
                for k in [1, 5, 10]:
                    metrics[f"{name}_R@{k}"] = np.mean(preds < k)
            return metrics
    img_t, txt_t, scale = torch.from_numpy(images), torch.from_numpy(texts), torch.tensor(1.0)
    fn = lambda: get_clip_metrics(img_t, txt_t, scale)
else:
    from experiments.retrieval import retrieval_metrics
    source = "experiments.retrieval.retrieval_metrics"
    t2i = np.arange(len(texts))
    fn = lambda: retrieval_metrics(images, texts, t2i, memory_budget=budget, progress=False)
t0 = time.perf_counter()
with PeakRSS() as peak:
    out = fn()
print(json.dumps({"peak_mib": peak.peak_mib, "method": peak.method, "seconds": time.perf_counter() - t0,
                  "source": source, "r1": float(out["image_to_text_R@1"] * 100 if which == "peer"
                                               else out["image_to_text"]["R@1"])}))
"""


def _child_peak(which: str, folder: str, budget: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, which, folder, str(budget)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {which!r} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

def _bare_matmul_pass(images, texts, budget: int) -> float:
    """Seconds of ``T[rows] @ I.T`` over the evaluator's blocks, into one reused buffer."""
    import torch

    from experiments.retrieval import balanced_chunks, rows_for_budget

    I, T = torch.from_numpy(images), torch.from_numpy(texts)
    rows = min(len(texts), rows_for_budget(len(images), budget))
    out = torch.empty(rows, len(images))
    t0 = time.perf_counter()
    for s, e in balanced_chunks(len(texts), rows):
        torch.mm(T[s:e], I.T, out=out[: e - s])
    return time.perf_counter() - t0


def _cli_startup() -> float:
    """Seconds of ``alignfuse retrieval`` on 10 images x 20 captions in a fresh process: interpreter
    start, imports, argument parsing, loading, evaluation and printing, i.e. what the CLI adds."""
    images, texts, t2i = make_data(10, 2, 8)
    with tempfile.TemporaryDirectory(prefix="alignfuse_bench_cli_") as tmp:
        paths = [str(Path(tmp) / f) for f in ("I.npy", "T.npy", "M.npy")]
        for path, arr in zip(paths, (images, texts, t2i)):
            np.save(path, arr)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "experiments.cli", "retrieval", "--image-emb", paths[0],
                               "--text-emb", paths[1], "--text-to-image", paths[2]], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"alignfuse retrieval failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def _faiss_flat_both(images, texts, k: int = 10) -> tuple[float, np.ndarray, np.ndarray]:
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(images.shape[1])
    index.add(texts)
    _, i2t = index.search(images, k)
    index = faiss.IndexFlatIP(images.shape[1])
    index.add(images)
    _, t2i = index.search(texts, k)
    return time.perf_counter() - t0, i2t, t2i


def run(args: argparse.Namespace) -> dict:
    import torch

    from experiments.retrieval import (
        caption_index,
        metrics_from_ranks,
        recall_at_k_from_topk,
        retrieval_metrics,
        retrieval_ranks,
    )

    budget = int(args.memory_mib * 2**20)
    t0 = time.perf_counter()
    images, texts, t2i = make_data(args.n_images, args.captions_per_image, args.dim, args.noise, args.seed)
    shape = {"n_images": args.n_images, "n_texts": len(texts), "dim": args.dim,
             "captions_per_image": args.captions_per_image, "threads": torch.get_num_threads()}
    print(f"data: {args.n_images} images x {len(texts)} captions, {args.dim}-d "
          f"({time.perf_counter() - t0:.1f}s); torch threads {torch.get_num_threads()}", flush=True)
    fig: dict = {"shape": shape, "goals": {"ours_over_matmul_max": GOAL_MATMUL_RATIO,
                                          "ours_with_cli_over_matmul_max": GOAL_CLI_RATIO,
                                          "faiss_over_ours_min": GOAL_FAISS_SPEEDUP,
                                          "ours_over_peer_memory_max": GOAL_MEMORY_RATIO}}

    bare1 = _bare_matmul_pass(images, texts, budget)
    print(f"bare matmul pass:   {bare1:8.2f} s", flush=True)
    t0 = time.perf_counter()
    with PeakRSS() as peak:  # retrieval_metrics = these two calls; split to report the filter
        ranks = retrieval_ranks(images, texts, t2i, memory_budget=budget, precision=args.precision,
                                progress=False)
        ours = metrics_from_ranks(ranks)
    t_ours = time.perf_counter() - t0
    print(f"evaluator:          {t_ours:8.2f} s  (peak +{peak.peak_mib:.0f} MiB, {ranks.precision} filter, "
          f"{ranks.n_rescored} comparisons re-scored in float64)", flush=True)
    bare2 = _bare_matmul_pass(images, texts, budget)
    print(f"bare matmul pass:   {bare2:8.2f} s", flush=True)
    bare = (bare1 + bare2) / 2
    fig.update(bare_matmul_s=[bare1, bare2], ours_s=t_ours, ours_over_matmul=t_ours / bare,
               ours_peak_mib_full=peak.peak_mib, metrics=ours, precision=ranks.precision,
               n_rescored=ranks.n_rescored)
    t_cli = _cli_startup()
    fig.update(cli_startup_s=t_cli, ours_with_cli_over_matmul=(t_ours + t_cli) / bare)
    print(f"CLI start-up:       {t_cli:8.2f} s  (alignfuse retrieval on 10 images, fresh process)", flush=True)
    if args.with_map:
        t0 = time.perf_counter()
        with_map = retrieval_metrics(images, texts, t2i, memory_budget=budget, with_map=True, progress=False)
        fig.update(ours_map_s=time.perf_counter() - t0, metrics_with_map=with_map)
        fig["ours_map_over_matmul"] = fig["ours_map_s"] / bare
        print(f"evaluator with mAP: {fig['ours_map_s']:8.2f} s", flush=True)

    if not args.skip_faiss:
        t_faiss, top_i2t, top_t2i = _faiss_flat_both(images, texts)
        caps = caption_index(t2i, len(images))
        fig.update(faiss_flat_s=t_faiss, faiss_over_ours=t_faiss / t_ours, faiss_metrics={
            "image_to_text": recall_at_k_from_topk(top_i2t, caps),
            "text_to_image": recall_at_k_from_topk(top_t2i, t2i)})
        print(f"faiss IndexFlatIP:  {t_faiss:8.2f} s", flush=True)

    if not args.skip_memory:
        with tempfile.TemporaryDirectory(prefix="alignfuse_bench_") as tmp:
            first = caption_index(t2i, len(images))[:, 0]  # 1:1 subset: each image with its first caption
            np.save(Path(tmp) / "images.npy", images)
            np.save(Path(tmp) / "texts.npy", np.ascontiguousarray(texts[first]))
            peer = _child_peak("peer", tmp, budget)
            mine = _child_peak("ours", tmp, budget)
        fig.update(peer_memory=peer, ours_memory_1to1=mine,
                   ours_over_peer_memory=mine["peak_mib"] / max(peer["peak_mib"], 1e-9))
        print(f"peak memory 1:1 {len(images)}x{len(images)}: peer ({peer['source']}) +{peer['peak_mib']:.0f} MiB "
              f"in {peer['seconds']:.1f}s, ours +{mine['peak_mib']:.0f} MiB in {mine['seconds']:.1f}s "
              f"[{mine['method']}]", flush=True)

    print()
    print(f"{'figure':<44}{'measured':>10}{'goal':>10}  ok")
    rows = [("evaluator / bare float32 matmul pass (wall)", fig["ours_over_matmul"], f"<= {GOAL_MATMUL_RATIO}",
             fig["ours_over_matmul"] <= GOAL_MATMUL_RATIO),
            ("(evaluator + CLI start-up) / bare matmul", fig["ours_with_cli_over_matmul"], f"<= {GOAL_CLI_RATIO}",
             fig["ours_with_cli_over_matmul"] <= GOAL_CLI_RATIO)]
    if "ours_map_over_matmul" in fig:
        rows.append(("evaluator with mAP / bare matmul pass", fig["ours_map_over_matmul"], "-", True))
    if "faiss_over_ours" in fig:
        rows.append(("faiss IndexFlatIP top-10 / evaluator", fig["faiss_over_ours"], f">= {GOAL_FAISS_SPEEDUP}",
                     fig["faiss_over_ours"] >= GOAL_FAISS_SPEEDUP))
    if "ours_over_peer_memory" in fig:
        rows.append(("peak memory evaluator / get_clip_metrics", fig["ours_over_peer_memory"],
                     f"<= {GOAL_MEMORY_RATIO}", fig["ours_over_peer_memory"] <= GOAL_MEMORY_RATIO))
    for name, value, goal, ok in rows:
        print(f"{name:<44}{value:>10.3f}{goal:>10}  {'yes' if ok else 'NO'}")
    i2t, t2i_m = ours["image_to_text"], ours["text_to_image"]
    print(f"metrics: i2t R@1 {i2t['R@1']:.2f} R@10 {i2t['R@10']:.2f} medR {i2t['median_rank']:.0f}; "
          f"t2i R@1 {t2i_m['R@1']:.2f} R@10 {t2i_m['R@10']:.2f} medR {t2i_m['median_rank']:.0f}; "
          f"rsum {ours['rsum']:.2f}")
    return fig
