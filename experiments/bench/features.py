"""``alignfuse bench features``: feature-extraction throughput of our frozen encoders against the plain forward.

Ours is :func:`experiments.features.encode_batched` with the encoders' defaults (MobileNetV2: BatchNorm
folded into the convolutions, channels-last, ``inference_mode``; MiniLM: length-sorted batches,
``inference_mode``). The peer, in the same process on the same inputs and batch size, is the plain
torchvision / transformers forward under ``torch.no_grad()`` with default settings, producing the same
outputs (pooled + grid; mean-pooled normalised sentence vectors). Preprocessing is timed for both.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

HELP = "feature-extraction throughput (MobileNetV2 at 128/224 px, MiniLM) vs the plain torchvision/transformers forward"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1024, help="images and captions per measurement")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (ours and peer)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="MobileNetV2 input sizes (px)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the best is kept")
    parser.add_argument("--data", choices=["shapesworld", "random"], default="shapesworld",
                        help="ShapesWorld scenes/captions, or random images and template captions "
                             "(also the fallback when ShapesWorld is not available)")
    parser.add_argument("--no-text", action="store_true", help="skip the MiniLM measurement")


def _random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = max(1, size // 16)
    low = rng.integers(0, 256, (n, cells, cells, 3), dtype=np.uint8)
    return low.repeat(size // cells + 1, axis=1).repeat(size // cells + 1, axis=2)[:, :size, :size]


def _template_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    colours, shapes = ["red", "green", "blue", "yellow", "purple"], ["square", "circle", "triangle", "star"]
    sizes, relations = ["small", "large", ""], ["left of", "right of", "above", "below", "in front of"]
    out = []
    for _ in range(n):
        a = f"a {rng.choice(sizes)} {rng.choice(colours)} {rng.choice(shapes)}".replace("  ", " ")
        b = f"a {rng.choice(colours)} {rng.choice(shapes)}"
        out.append(a if rng.random() < 0.3 else f"{a} {rng.choice(relations)} {b}")
    return out


def _data(kind: str, n: int, size: int) -> tuple[np.ndarray, list[str], str]:
    if kind == "shapesworld":
        try:
            from experiments.data.shapesworld import load_shapesworld
        except ImportError as e:
            log.warning("ShapesWorld not available (%s); using random images and template captions", e)
        else:
            data = load_shapesworld(n_scenes=n, image_size=size)
            captions = [c for cs in data.captions for c in cs][:n]
            return np.ascontiguousarray(data.images[:n]), captions, "shapesworld"
    return _random_images(n, size), _template_captions(n), "random"


def _best_times(fns: list[Callable[[], Any]], repeats: int) -> list[tuple[float, Any]]:
    """Best wall time and last output of each function; the functions alternate so that they share the load."""
    best: list[tuple[float, Any]] = [(float("inf"), None)] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out = fn()
            best[i] = (min(best[i][0], time.perf_counter() - t0), out)
    return best


def _bench_mobilenet(images: np.ndarray, size: int, batch_size: int, repeats: int) -> dict[str, Any]:
    import torch
    import torchvision

    from align.weights import MOBILENET_V2, package_file
    from experiments.features import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2Encoder, resize_center_crop, encode_batched

    ours = MobileNetV2Encoder(image_size=size)
    plain = torchvision.models.mobilenet_v2()
    plain.load_state_dict(torch.load(package_file(*MOBILENET_V2), map_location="cpu", weights_only=True))
    plain.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def peer() -> dict[str, np.ndarray]:
        pooled, grid = [], []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = torch.tensor(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255
                x = (resize_center_crop(x, size) - mean) / std
                fmap = plain.features(x)
                pooled.append(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(fmap, 1), 1).numpy())
                grid.append(fmap.flatten(2).transpose(1, 2).half().numpy())
        return {"pooled": np.concatenate(pooled), "grid": np.concatenate(grid)}

    def run_ours() -> dict[str, np.ndarray]:
        return encode_batched(ours, images, batch_size=batch_size, progress=False)

    warm = images[:batch_size]
    ours.encode(warm)
    with torch.no_grad():
        plain.features((resize_center_crop(torch.tensor(warm).permute(0, 3, 1, 2).float() / 255, size) - mean) / std)
    (t_peer, ref), (t_ours, got) = _best_times([peer, run_ours], repeats)
    n = len(images)
    return {"n": n, "ours_per_s": n / t_ours, "peer_per_s": n / t_peer, "speedup": t_peer / t_ours,
            "grid_shape": list(got["grid"].shape[1:]),
            "max_abs_diff_pooled": float(np.abs(got["pooled"] - ref["pooled"]).max())}


def _bench_minilm(captions: list[str], batch_size: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from experiments.features import MiniLMEncoder, encode_batched

    ours = MiniLMEncoder()
    tokenizer = AutoTokenizer.from_pretrained(ours.model_dir, local_files_only=True)
    plain = AutoModel.from_pretrained(ours.model_dir, local_files_only=True).float().eval()

    def peer() -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                batch = tokenizer(captions[start:start + batch_size], padding=True, truncation=True,
                                  max_length=ours.max_length, return_tensors="pt")
                hidden = plain(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1).numpy())
        return np.concatenate(out)

    def run_ours() -> np.ndarray:
        return encode_batched(ours, captions, batch_size=batch_size, progress=False)["pooled"]

    ours.encode(captions[:batch_size])
    fns: list[Callable[[], Any]] = [peer, run_ours]
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        st = None
    else:  # the reference library, for information
        st = SentenceTransformer(str(ours.model_dir), device="cpu")
        fns.append(lambda: st.encode(captions, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))
    timed = _best_times(fns, repeats)
    (peer_t, ref), (ours_t, got) = timed[:2]
    n = len(captions)
    result = {"n": n, "ours_per_s": n / ours_t, "peer_per_s": n / peer_t, "speedup": peer_t / ours_t,
              "max_abs_diff_pooled": float(np.abs(got - ref).max())}
    if st is None:
        return result
    st_t, st_out = timed[2]
    result.update(sentence_transformers_per_s=n / st_t,
                  max_abs_diff_vs_sentence_transformers=float(np.abs(got - st_out).max()))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.n < 1 or args.batch_size < 1 or args.repeats < 1:
        raise ValueError(f"--n, --batch-size and --repeats must be positive, "
                         f"got {args.n}, {args.batch_size}, {args.repeats}")
    figures: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
                               "load_average_before": os.getloadavg()[0]}
    rows = []
    for size in args.sizes:
        images, captions, source = _data(args.data, args.n, size)
        figures["data"] = source
        log.info("MobileNetV2 at %d px on %d %s images", size, len(images), source)
        r = figures[f"mobilenet_v2_{size}px"] = _bench_mobilenet(images, size, args.batch_size, args.repeats)
        rows.append((f"MobileNetV2 {size}px (pooled+grid)", "img/s", r))
    if not args.no_text:
        _, captions, source = _data(args.data, args.n, min(args.sizes))
        log.info("MiniLM on %d %s captions", len(captions), source)
        r = figures["minilm"] = _bench_minilm(captions, args.batch_size, args.repeats)
        rows.append(("all-MiniLM-L6-v2 (pooled)", "txt/s", r))

    figures["load_average_after"] = os.getloadavg()[0]
    print(f"\nfeature extraction, {figures['data']} data, batch {args.batch_size}, {figures['torch_threads']} torch "
          f"threads, load average {figures['load_average_before']:.1f} before / "
          f"{figures['load_average_after']:.1f} after")
    print(f"{'encoder':<36}{'unit':>7}{'ours':>10}{'peer':>10}{'ratio':>8}{'max|Δ|':>10}")
    for label, unit, r in rows:
        print(f"{label:<36}{unit:>7}{r['ours_per_s']:>10.1f}{r['peer_per_s']:>10.1f}{r['speedup']:>7.2f}x"
              f"{r['max_abs_diff_pooled']:>10.1e}")
    if "sentence_transformers_per_s" in figures.get("minilm", {}):
        st_rate = figures["minilm"]["sentence_transformers_per_s"]
        print(f"{'  sentence-transformers encode':<36}{'txt/s':>7}{st_rate:>10.1f}")
    print("peer: plain torchvision/transformers forward, same batches, torch.no_grad(), default settings")
    return figures
