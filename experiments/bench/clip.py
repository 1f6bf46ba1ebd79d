"""``alignfuse bench clip``: CLIP towers training throughput, our Trainer vs open_clip_train's own loop.

Both sides train the same open_clip model (a small ViT-CLIP, identical initial weights) on the
same pre-processed data, in the same sample order, with the same optimiser (AdamW, no weight
decay on gains/biases/``logit_scale``), cosine schedule and batch size:

* **alignfuse**: ``Trainer(TrainConfig(...)).fit(CLIPTowers, {"image", "text"})``;
* **open_clip**: ``open_clip_train.train.train_one_epoch`` (the real function from the
  open-clip-torch wheel) with its ``ClipLoss``, a ``DistributedSampler``-ordered DataLoader as
  open_clip_train's CSV dataset uses, and the AdamW param groups of ``open_clip_train.main``.

Throughput counts only the steps after ``--warmup``: a forward pre-hook stamps the start of the
first timed forward, and the clock stops when the training call returns (so per-step overheads of
each loop — data loading, optimiser, scheduler, logging — are inside the timed window, setup is
not). After an untimed priming round of both, sides alternate ``--repeats`` times; medians are
reported, as samples per wall-clock second and per CPU second of the process (the latter is the
steadier figure on a shared CPU; on CUDA the wall-clock one is what counts). As a check that both loops
optimise the same thing, the contrastive loss of both trained models on a fixed probe batch is
printed (equal up to float rounding, since data order and hyper-parameters match).
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from typing import Any

HELP = "CLIP towers training throughput: alignfuse Trainer vs open_clip_train.train_one_epoch"

log = logging.getLogger(__name__)

_WORDS = ["a", "the", "red", "green", "blue", "yellow", "small", "large", "cube", "sphere", "cone", "left", "right",
          "of", "above", "below", "two", "three", "next", "to", "and", "shiny", "matte", "purple", "cylinder"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (alternating); medians are reported")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128, help="width of both towers")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers of both towers")
    parser.add_argument("--context-length", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (both sides)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)


class _FirstTimedForward:
    """Forward pre-hook that stamps the start of forward call number ``start_at`` (0-based)."""

    def __init__(self, start_at: int, device: Any) -> None:
        self.start_at, self.device = start_at, device
        self.calls, self.t0, self.cpu0 = 0, None, None

    def __call__(self, module: Any, args: Any) -> None:
        if self.calls == self.start_at:
            _sync(self.device)
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.calls += 1

    def stop(self, samples: int) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second of this process) since the stamp."""
        _sync(self.device)
        return samples / (time.perf_counter() - self.t0), samples / (time.process_time() - self.cpu0)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_data(model: Any, n: int, seed: int) -> tuple[Any, Any]:
    """Pre-processed random images [n, 3, S, S] and token ids [n, L] of random captions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = model.image_size
    images = model.preprocess(torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g))
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    words = torch.randint(0, len(_WORDS), (sum(lengths),), generator=g).tolist()
    captions, i = [], 0
    for length in lengths:
        captions.append(" ".join(_WORDS[j] for j in words[i:i + length]))
        i += length
    return images, model.tokenize(captions)


def _run_alignfuse(model: Any, images: Any, tokens: Any, a: argparse.Namespace, device: Any, bf16: bool
                   ) -> tuple[float, float]:
    """(wall, CPU) samples/s of the timed steps of ``Trainer.fit``."""
    from experiments.trainer import Trainer, TrainConfig

    cfg = TrainConfig(max_steps=a.warmup + a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                      progress=False, device=str(device), precision="bf16" if bf16 else "fp32", seed=a.seed)
    clock = _FirstTimedForward(a.warmup, device)
    hook = model.register_forward_pre_hook(clock)
    try:
        n = (a.warmup + a.steps) * a.batch_size
        Trainer(cfg).fit(model, {"image": images[:n], "text": tokens[:n]})
        rates = clock.stop(a.steps * a.batch_size)
    finally:
        hook.remove()
    if clock.calls != a.warmup + a.steps:
        raise RuntimeError(f"expected {a.warmup + a.steps} forward calls from the Trainer, saw {clock.calls}")
    return rates


def _open_clip_data_info(loader: Any, sampler: Any) -> Any:
    """open_clip_train's ``DataInfo`` (its module needs webdataset/braceexpand; a same-shaped stand-in if absent)."""
    try:
        from open_clip_train.data import DataInfo
    except ImportError:
        class DataInfo:  # the two members train_one_epoch uses, as in open_clip_train/data.py
            def __init__(self, dataloader: Any, sampler: Any = None) -> None:
                self.dataloader, self.sampler = dataloader, sampler

            def set_epoch(self, epoch: int) -> None:
                if self.sampler is not None:
                    self.sampler.set_epoch(epoch)
    return DataInfo(dataloader=loader, sampler=sampler)


def _run_open_clip(clip: Any, images: Any, tokens: Any, a: argparse.Namespace, device: Any, bf16: bool
                   ) -> tuple[float, float]:
    """(wall, CPU) samples/s of the timed steps of ``open_clip_train.train.train_one_epoch``."""
    import torch
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    total = a.warmup + a.steps
    n = total * a.batch_size  # train_one_epoch runs one whole epoch: exactly ``total`` batches
    dataset = TensorDataset(images[:n], tokens[:n])
    # open_clip_train's CSV path: DistributedSampler(dataset), shuffle=False, drop_last=True (here 1 replica)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=a.seed)
    loader = DataLoader(dataset, batch_size=a.batch_size, shuffle=False, sampler=sampler, num_workers=0,
                        pin_memory=device.type == "cuda", drop_last=True)
    loader.num_samples, loader.num_batches = len(loader) * a.batch_size, len(loader)
    data = {"train": _open_clip_data_info(loader, sampler)}

    clip.to(device)
    clip.output_dict = True  # train_one_epoch reads model_out["logit_scale"]
    # param groups of open_clip_train.main
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in clip.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": a.weight_decay}],
        lr=a.lr, betas=(0.9, 0.999))  # the Trainer's betas/eps, so both sides run the same optimiser
    scheduler = cosine_lr(optimizer, a.lr, 0, total)
    loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    args = argparse.Namespace(
        device=str(device), precision="amp_bf16" if bf16 else "fp32", distill=False, accum_freq=1,
        skip_scheduler=False, grad_clip_norm=None, horovod=False, log_every_n_steps=100, batch_size=a.batch_size,
        world_size=1, rank=0, local_rank=0, wandb=False)

    clock = _FirstTimedForward(a.warmup, device)
    hook = clip.register_forward_pre_hook(clock)
    try:
        train_one_epoch(clip, data, loss, 0, optimizer, None, scheduler, None, args, tb_writer=None)
        rates = clock.stop(a.steps * a.batch_size)
    finally:
        hook.remove()
    if clock.calls != total:
        raise RuntimeError(f"expected {total} forward calls from train_one_epoch, saw {clock.calls}")
    return rates


def _probe_loss(clip: Any, images: Any, tokens: Any, device: Any) -> float:
    """ClipLoss of an open_clip model on a fixed batch (scale clamped as in training)."""
    import math

    import torch
    from open_clip.loss import ClipLoss

    clip.eval()
    with torch.no_grad():
        i = clip.encode_image(images.to(device), normalize=True)
        t = clip.encode_text(tokens.to(device), normalize=True)
        scale = clip.logit_scale.clamp(0, math.log(100)).exp()
        return float(ClipLoss()(i.float(), t.float(), scale.float()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import open_clip
    import torch

    from align.clip import CLIPTowers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise ValueError("--precision bf16 needs a CUDA device (the Trainer autocasts bf16 on CUDA only)")
    if min(args.steps, args.batch_size, args.repeats) < 1 or args.warmup < 0:
        raise ValueError("--steps, --batch-size and --repeats must be >= 1 and --warmup >= 0")

    config = {
        "embed_dim": args.embed_dim,
        "vision_cfg": {"image_size": args.image_size, "patch_size": args.patch_size, "width": args.width,
                       "layers": args.layers, "head_width": 32},
        "text_cfg": {"context_length": args.context_length, "vocab_size": 49408, "width": args.width,
                     "heads": max(1, args.width // 32), "layers": args.layers},
    }
    torch.manual_seed(args.seed)
    base = CLIPTowers(**config)
    n = (args.warmup + args.steps) * args.batch_size
    images, tokens = _make_data(base, n, args.seed)
    probe = (images[: args.batch_size], tokens[: args.batch_size])
    print(f"CLIP towers ViT {args.image_size}px/{args.patch_size}, width {args.width}, {args.layers}+{args.layers} "
          f"layers, {sum(p.numel() for p in base.parameters()):,} parameters; batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repeats on {device}"
          f"{' bf16' if bf16 else ' fp32'} ({torch.get_num_threads()} threads)")

    # an untimed priming round of both sides, so the first timed run does not pay the process's cold start
    prime = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
    _run_alignfuse(copy.deepcopy(base), images, tokens, prime, device, bf16)
    _run_open_clip(copy.deepcopy(base).model, images, tokens, prime, device, bf16)

    runs: dict[str, list[tuple[float, float]]] = {"alignfuse": [], "open_clip": []}
    probe_after: dict[str, float] = {}
    for r in range(args.repeats):
        for name in (["alignfuse", "open_clip"] if r % 2 == 0 else ["open_clip", "alignfuse"]):  # alternate
            model = copy.deepcopy(base)
            side = _run_alignfuse if name == "alignfuse" else _run_open_clip
            runs[name].append(side(model if name == "alignfuse" else model.model, images, tokens, args, device, bf16))
            probe_after[name] = _probe_loss(model.model, *probe, device)
            log.info("repeat %d %s: %.1f samples/s (%.1f per CPU second)", r, name, *runs[name][-1])
            del model
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    ratio, cpu_ratio = wall["alignfuse"] / wall["open_clip"], cpu["alignfuse"] / cpu["open_clip"]
    probe_init = _probe_loss(copy.deepcopy(base.model), *probe, device)

    labels = {"alignfuse": "alignfuse Trainer.fit", "open_clip": "open_clip_train train_one_epoch"}
    print(f"{'loop':<34}{'samples/s':>12}{'per CPU-s':>12}   runs (samples/s)")
    for k in ("alignfuse", "open_clip"):
        print(f"{labels[k]:<34}{wall[k]:>12.1f}{cpu[k]:>12.1f}   {', '.join(f'{w:.1f}' for w, _ in runs[k])}")
    print(f"ratio alignfuse / open_clip: {ratio:.3f}x wall-clock, {cpu_ratio:.3f}x per CPU second (goal >= 1.0x)")
    print(f"probe-batch loss: initial {probe_init:.4f}, after alignfuse {probe_after['alignfuse']:.4f}, "
          f"after open_clip {probe_after['open_clip']:.4f} (same data order and optimiser: should agree)")
    return {
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "open_clip_version": open_clip.__version__,
        "model_config": config,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "alignfuse_samples_per_s": wall["alignfuse"],
        "open_clip_samples_per_s": wall["open_clip"],
        "ratio": ratio,
        "alignfuse_samples_per_cpu_s": cpu["alignfuse"],
        "open_clip_samples_per_cpu_s": cpu["open_clip"],
        "cpu_ratio": cpu_ratio,
        "runs": {k: [{"samples_per_s": w, "samples_per_cpu_s": c} for w, c in v] for k, v in runs.items()},
        "probe_loss": {"initial": probe_init, **probe_after},
    }
