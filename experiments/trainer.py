"""The one training loop of alignfuse.

Every gradient-trained model (aligners, fusion heads, connectors) exposes
``loss(batch) -> Tensor | dict[str, Tensor]`` and the :class:`Trainer` owns the rest:
AdamW with per-group weight decay, warm-up + cosine learning rate, gradient clipping and
accumulation, bf16 autocast on GPU, validation through an evaluator, best/last checkpoints,
early stopping, exact resume, JSON-lines metrics, TensorBoard (when installed) and
DistributedDataParallel under ``torchrun``. Closed-form models (``fit`` and no ``loss``,
see :func:`align.base.is_closed_form`) go through the same :meth:`Trainer.fit`, so an
experiment never branches on the method::

    trainer = Trainer(TrainConfig(max_steps=2000, batch_size=256, lr=5e-4, eval_every=200,
                                  out_dir="runs/clip"), evaluator=retrieval_evaluator)
    result = trainer.fit(model, {"image": image_feats, "text": text_feats})
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler
from tqdm.auto import tqdm

from align.base import is_closed_form
from experiments import distributed as D
from experiments.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, seed_everything, set_rng_state
from experiments.config import TrainSection

log = logging.getLogger(__name__)

Evaluator = Callable[[Any], Mapping[str, float]]
CHECKPOINT_FORMAT = 1
# parameter names (last dotted component) that never get weight decay, whatever their shape
NO_DECAY_NAMES = frozenset({"logit_scale", "logit_bias"})
# config fields that change the optimisation trajectory: a resume with other values is not exact
_TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "grad_clip",
                      "grad_accum", "seed", "drop_last", "max_steps", "epochs")

#: the one home of the training defaults is the config model; TrainConfig (plain types, stored in checkpoints)
#: takes its defaults from it
_DEFAULTS = TrainSection()


@dataclass
class TrainConfig:
    """Everything the Trainer needs; plain types only, stored in every checkpoint.

    Lengths are counted in optimiser steps (one step = ``grad_accum`` micro-batches).
    ``max_steps`` wins over ``epochs`` when set. ``batch_size`` is per process: under
    ``torchrun`` with N processes the global batch is ``N * batch_size * grad_accum``.
    ``eval_every=None`` evaluates once, at the end; ``save_every`` (default 100 steps) bounds
    the steps a killed run loses (``None``: ``last.pt`` only at the end). ``out_dir=None``
    writes no files at all. A first Ctrl-C stops at the next step boundary after writing
    ``last.pt`` and raises ``KeyboardInterrupt``; ``fit`` again resumes there.
    """

    max_steps: int | None = _DEFAULTS.max_steps
    epochs: int = _DEFAULTS.epochs
    batch_size: int = _DEFAULTS.batch_size
    lr: float = _DEFAULTS.lr
    weight_decay: float = _DEFAULTS.weight_decay
    betas: tuple[float, float] = _DEFAULTS.betas
    warmup_steps: int = _DEFAULTS.warmup_steps
    min_lr_ratio: float = _DEFAULTS.min_lr_ratio
    grad_clip: float | None = _DEFAULTS.grad_clip
    grad_accum: int = _DEFAULTS.grad_accum
    eval_every: int | None = _DEFAULTS.eval_every
    early_stopping_patience: int | None = _DEFAULTS.early_stopping_patience
    monitor: str = _DEFAULTS.monitor
    mode: str = _DEFAULTS.mode
    out_dir: str | Path | None = None
    save_every: int | None = _DEFAULTS.save_every
    keep_best: bool = _DEFAULTS.keep_best
    seed: int = 0
    device: str = _DEFAULTS.device
    precision: str = _DEFAULTS.precision
    num_workers: int = _DEFAULTS.num_workers
    log_every: int = _DEFAULTS.log_every
    progress: bool = _DEFAULTS.progress
    drop_last: bool = _DEFAULTS.drop_last
    find_unused_parameters: bool = _DEFAULTS.find_unused_parameters  # passed to DistributedDataParallel

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("TrainConfig.warmup_steps and num_workers must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"TrainConfig.mode must be 'max' or 'min', got {self.mode!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"TrainConfig.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON/``weights_only``-safe plain types."""
        d = dataclasses.asdict(self)
        d["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    ``history``: the metrics records (``kind`` "train" or "eval", see :class:`Trainer`),
    including those of earlier sessions of a resumed run. ``best_metrics``/``best_step``:
    the evaluation with the best ``monitor`` value (None without an evaluator).
    ``final_metrics``: the evaluation of the final weights. ``train_seconds``: wall time of
    ``fit`` summed over sessions. ``n_trainable``/``n_frozen``: parameter counts (elements).
    """

    history: list[dict[str, Any]]
    best_metrics: dict[str, float] | None
    best_step: int | None
    final_metrics: dict[str, float] | None
    train_seconds: float
    n_trainable: int
    steps: int
    n_frozen: int = 0
    stopped_early: bool = False


class DictDataset(Dataset):
    """Rows of equal-length arrays: ``ds[i] == {key: arrays[key][i]}``.

    Values may be tensors, numpy arrays (numeric ones become tensors, sharing memory) or
    sequences such as lists of strings. Indexing with a list/array of indices returns a whole
    batch by fancy indexing (``ds[[0, 5, 2]] == {key: arrays[key][[0, 5, 2]]}``), which the
    Trainer's DataLoader uses instead of collating row by row.
    """

    indexes_batches = True

    def __init__(self, arrays: Mapping[str, Tensor | np.ndarray | Sequence]):
        if not arrays:
            raise ValueError("train_data is an empty dict; expected {modality: array [N, ...]}")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
            raise ValueError(f"train_data arrays must have equal lengths, got {detail}")
        self.arrays: dict[str, Tensor | list] = {}
        for k, v in arrays.items():
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
                v = torch.from_numpy(np.ascontiguousarray(v))
            elif not isinstance(v, Tensor):
                v = list(v)
            self.arrays[k] = v
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int | Sequence[int] | Tensor) -> dict[str, Any]:
        if isinstance(i, (int, np.integer)) or (isinstance(i, Tensor) and i.ndim == 0):
            return {k: v[i] for k, v in self.arrays.items()}
        idx = torch.as_tensor(i, dtype=torch.long)
        return {k: v[idx] if isinstance(v, Tensor) else [v[j] for j in idx.tolist()] for k, v in self.arrays.items()}


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches of one epoch: a shuffle that depends only on ``(seed, epoch)``.

    The permutation and the rank sharding are those of ``DistributedSampler`` (padding with
    repeated indices so every rank gets as many batches; truncating instead with
    ``drop_last``). ``set_epoch(epoch, skip)`` selects the epoch and skips its first
    ``skip`` batches, which is how a resumed run continues mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=drop_last)
        self._skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self._sampler.set_epoch(epoch)
        self._skip = skip

    def batches_per_epoch(self) -> int:
        n = self._sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self._skip)

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self._sampler)
        for b in range(self._skip, self.batches_per_epoch()):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]


class LossModule(nn.Module):
    """``forward(batch) == model.loss(batch)``: the module DistributedDataParallel wraps, so its
    hooks see the loss computation (models keep ``forward`` for whatever they like)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Tensor | dict[str, Tensor]:
        return self.model.loss(batch)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: ``decay`` and ``no_decay``.

    No weight decay for parameters with ``ndim < 2`` (biases, norm scales, scalar
    temperatures), for those named ``logit_scale``/``logit_bias`` and for any name listed by
    ``model.no_weight_decay()`` if the model defines it (the timm convention). Empty groups
    are left out.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or name in extra:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _split_loss(out: Tensor | Mapping[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, {name: detached term}) from what ``model.loss`` returned."""
    if isinstance(out, Tensor):
        total, terms = out, {"loss": out}
    elif isinstance(out, Mapping):
        if not out:
            raise ValueError(f"model.loss returned an empty dict at step {step}")
        terms = {k: v if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in out.items()}
        total = terms["loss"] if "loss" in terms else sum(terms.values())
        terms = {**terms, "loss": total}
    else:
        raise TypeError(f"model.loss must return a Tensor or a dict of Tensors, got {type(out).__name__}")
    if total.numel() != 1:
        raise ValueError(f"model.loss must be a scalar, got shape {tuple(total.shape)} at step {step}")
    return total.reshape(()), {k: v.detach().float().reshape(()) for k, v in terms.items()}


@dataclass
class _State:
    """Loop position and bookkeeping; all of it goes into ``last.pt``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (per rank)
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    last_metrics: dict[str, float] | None = None
    seconds_before: float = 0.0  # wall time of earlier sessions
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["history"]  # lives in metrics.jsonl
        return d


class _StopOnSigint:
    """While installed (main thread only), the first Ctrl-C sets ``requested`` so the loop stops at the next step
    boundary and writes ``last.pt``; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _epochs_done(state: _State, n_batches: int) -> float:
    return round(state.epoch + state.batch_in_epoch / n_batches, 4)


class Trainer:
    """Fits any alignfuse model: ``Trainer(config, evaluator).fit(model, train_data)``.

    **Model contract.** A gradient model is an ``nn.Module`` with ``loss(batch)`` returning a
    scalar or a dict of named scalar terms (the total is ``"loss"`` if present, else their
    sum; every term is logged). A closed-form model has ``fit`` and no ``loss``: ``fit``
    gathers the full training arrays of ``model.modalities`` as numpy and calls
    ``model.fit(X, Y)``, then evaluates once. Optional hooks, called if the model defines them:

    * ``set_distributed(rank, world_size)``: called before training (with ``(0, 1)`` in a
      single process) so a model can build e.g. ``open_clip.loss.ClipLoss(local_loss=...,
      gather_with_grad=..., rank=rank, world_size=world_size)`` without importing
      ``experiments``. With ``gather_with_grad=True`` the DDP-averaged gradients equal the
      single-process gradients on the global batch, for ``local_loss`` False and True alike
      (``tests/experiments/test_distributed.py`` checks both).
    * ``no_weight_decay() -> set[str]``: parameter names to exclude from weight decay.

    **Evaluator.** ``evaluator(model) -> {name: float}``, called every ``eval_every`` steps and
    at the end with the model in eval mode under ``torch.no_grad`` (and in full precision);
    under DDP only rank 0 evaluates and broadcasts the metrics. ``monitor`` names the metric
    that selects ``best.pt`` and drives early stopping (patience counted in evaluations).

    **Files** (``out_dir``, rank 0 only): ``metrics.jsonl`` with one JSON record per logged
    step (``{"kind": "train", "step", "epoch", "lr", "loss", <terms>, "grad_norm"?, "elapsed"}``,
    terms averaged over the steps since the previous record, ``epoch`` counting epochs done
    as a fraction, ``elapsed`` in seconds since the run began) and per evaluation
    (``{"kind": "eval", "step", "epoch", "elapsed", <metrics>}``); ``last.pt`` (model,
    optimiser, scheduler, loop position, RNG states of every rank, config; for resuming);
    ``best.pt`` (model, step, metrics, config); ``tb/`` when TensorBoard is installed.
    ``fit(..., resume=True)`` continues from ``last.pt``: the data order is a function of
    (seed, epoch) and the consumed batches of the current epoch are skipped, so on CPU a
    resumed run ends bit-identical to an uninterrupted one (with ``num_workers=0``; workers
    that draw random augmentations restart their RNG on resume).

    **Non-finite losses** raise ``FloatingPointError`` naming the step and the loss terms.
    Losses are checked (one host sync) at every step that logs, evaluates or saves and
    before any checkpoint is written, so no checkpoint ever holds weights updated from a
    non-finite loss.

    Subclasses may override :meth:`configure_optimizer` and :meth:`configure_scheduler`.
    ``collate_fn`` replaces the default collation of ``Dataset`` samples; for a dict of
    arrays (or a :class:`DictDataset`) it receives the already-batched dict.
    """

    def __init__(self, config: TrainConfig | None = None, evaluator: Evaluator | None = None,
                 collate_fn: Callable[[Any], Any] | None = None):
        self.config = config if config is not None else TrainConfig()
        self.evaluator = evaluator
        self.collate_fn = collate_fn

    # ------------------------------------------------------------------ hooks

    def configure_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over :func:`param_groups` (trainable parameters only)."""
        groups = param_groups(model, self.config.weight_decay)
        if not groups:
            raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True; nothing to train")
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)

    def configure_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int
                            ) -> torch.optim.lr_scheduler.LRScheduler:
        """Linear warm-up then cosine decay, torch's own schedulers, stepped once per optimiser step.

        Step ``s`` (0-based) runs at ``lr * (s + 1) / warmup_steps`` during warm-up (``LinearLR``; no step at lr 0),
        then ``CosineAnnealingLR`` from ``lr`` down to ``min_lr_ratio * lr`` at ``total_steps``.
        """
        from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

        cfg = self.config
        warmup = min(cfg.warmup_steps, total_steps)
        cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=cfg.min_lr_ratio * cfg.lr)
        if warmup == 0:
            return cosine
        ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
        return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])

    # ------------------------------------------------------------------ entry point

    def fit(self, model: Any, train_data: Dataset | Mapping[str, Tensor | np.ndarray], resume: bool = True
            ) -> TrainResult:
        """Train ``model`` on ``train_data`` (a Dataset of dict samples, or a dict of equal-length
        arrays [N, ...]); with ``resume`` and an existing ``out_dir/last.pt``, continue from it."""
        if is_closed_form(model):
            return self._fit_closed_form(model, train_data)
        if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
            raise TypeError(f"{type(model).__name__} is neither an nn.Module with loss(batch) "
                            "nor a closed-form model with fit(X, Y)")
        return self._fit_gradient(model, train_data, resume)

    # ------------------------------------------------------------------ gradient path

    def _fit_gradient(self, model: nn.Module, train_data: Any, resume: bool) -> TrainResult:
        cfg = self.config
        t_start = time.perf_counter()
        info = D.init_distributed() if D.env_world_info().world_size > 1 else D.world_info()
        main = info.rank == 0
        device = self._device(info)
        use_bf16 = self._use_bf16(device)
        dataset = self._as_dataset(train_data)
        sampler = EpochBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                    world_size=info.world_size, drop_last=cfg.drop_last)
        n_batches = sampler.batches_per_epoch()
        if n_batches == 0:
            raise ValueError(f"train_data has {len(dataset)} samples: no batch of {cfg.batch_size} per process "
                             f"(world size {info.world_size}, drop_last={cfg.drop_last})")
        total_steps = cfg.max_steps or (cfg.epochs * n_batches) // cfg.grad_accum
        if total_steps < 1:
            raise ValueError(f"{cfg.epochs} epoch(s) of {n_batches} batches is less than one step of "
                             f"grad_accum={cfg.grad_accum} batches")

        model.to(device)
        if hasattr(model, "set_distributed"):
            model.set_distributed(info.rank, info.world_size)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        optimizer = self.configure_optimizer(model)
        scheduler = self.configure_scheduler(optimizer, total_steps)

        out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        state = _State()
        last_path = out_dir / "last.pt" if out_dir is not None else None
        if resume and last_path is not None and last_path.is_file():
            self._restore(last_path, model, optimizer, scheduler, state, info)
            if main:
                state.history = self._truncate_metrics(out_dir / "metrics.jsonl", state.step)
        else:
            seed_everything(cfg.seed + info.rank)
            if main and out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "metrics.jsonl").write_text("")
        last_saved_step = state.step if state.step > 0 else None

        log_main = log.info if main else log.debug  # one copy of each line, from rank 0
        log_main("%s: %s trainable parameters (%s frozen) on %s%s; %d steps, global batch %d = %d process(es) "
                 "x %d x %d accumulated; %d batches per epoch per process",
                 type(model).__name__, f"{n_trainable:,}", f"{n_frozen:,}", device, " bf16" if use_bf16 else "",
                 total_steps, info.world_size * cfg.batch_size * cfg.grad_accum, info.world_size, cfg.batch_size,
                 cfg.grad_accum, n_batches)

        wrapped: nn.Module = LossModule(model)
        if info.world_size > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        writer = self._tensorboard(out_dir) if main else None
        batches = self._micro_batches(dataset, sampler, state, device, info)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        pbar = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=None if (cfg.progress and main) else True)
        pending: list[tuple[int, float, dict[str, Tensor]]] = []  # (step, lr, terms) not yet on the host
        window: list[tuple[int, dict[str, float]]] = []  # checked, not yet logged

        def elapsed() -> float:
            return state.seconds_before + time.perf_counter() - t_start

        model.train()
        interrupt = _StopOnSigint()
        try:
            while state.step < total_steps and not state.stopped_early:
                if interrupt.requested:
                    if last_path is not None:
                        window += self._check_finite(pending, last_path, last_saved_step)
                        pending.clear()
                        self._save_last(last_path, model, optimizer, scheduler, state, elapsed(), info)
                    raise KeyboardInterrupt(f"interrupted at step {state.step}" + (
                        f"; checkpoint {last_path}" if last_path is not None else ""))
                lr = optimizer.param_groups[0]["lr"]
                terms = self._train_step(wrapped, optimizer, batches, trainable, autocast, state.step + 1,
                                         ddp=info.world_size > 1)
                scheduler.step()
                state.step += 1
                pending.append((state.step, lr, terms))
                pbar.update(1)

                s = state.step
                is_last = s == total_steps
                do_log = s % cfg.log_every == 0 or is_last
                do_eval = self.evaluator is not None and cfg.eval_every is not None and s % cfg.eval_every == 0
                do_save = last_path is not None and cfg.save_every is not None and s % cfg.save_every == 0
                if not (do_log or do_eval or do_save or is_last):
                    continue
                window += self._check_finite(pending, last_path, last_saved_step)
                pending.clear()
                if do_log:
                    rec = self._train_record(window, state, n_batches, elapsed())
                    window.clear()
                    state.history.append(rec)
                    if main:
                        self._write_record(out_dir, writer, rec)
                        pbar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                if do_eval:
                    self._eval_and_track(model, state, n_batches, elapsed(), out_dir, writer, info)
                if do_save:
                    self._save_last(last_path, model, optimizer, scheduler, state, elapsed(), info)
                    last_saved_step = s

            if self.evaluator is not None and state.last_eval_step != state.step:
                self._eval_and_track(model, state, n_batches, elapsed(), out_dir, writer, info, final=True)
            if last_path is not None and last_saved_step != state.step:
                self._save_last(last_path, model, optimizer, scheduler, state, elapsed(), info)
        finally:
            interrupt.restore()
            pbar.close()
            if writer is not None:
                writer.close()

        seconds = elapsed()
        log_main("trained %d steps in %.1f s%s", state.step, seconds,
                 f"; best {cfg.monitor}={state.best_value:.4g} at step {state.best_step}"
                 if state.best_value is not None else "")
        return TrainResult(history=state.history, best_metrics=state.best_metrics, best_step=state.best_step,
                           final_metrics=state.last_metrics, train_seconds=seconds, n_trainable=n_trainable,
                           steps=state.step, n_frozen=n_frozen, stopped_early=state.stopped_early)

    def _train_step(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Any],
                    trainable: list[nn.Parameter], autocast: Callable[[], Any], step: int, ddp: bool
                    ) -> dict[str, Tensor]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the terms averaged over them."""
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for i in range(cfg.grad_accum):
            batch = next(batches)
            # DDP all-reduces gradients in backward; skip that until the last micro-batch
            sync = contextlib.nullcontext() if (not ddp or i == cfg.grad_accum - 1) else wrapped.no_sync()
            with sync:
                with autocast():
                    out = wrapped(batch)
                total, terms = _split_loss(out, step)
                (total / cfg.grad_accum).backward()
            if sums and terms.keys() != sums.keys():
                raise ValueError(f"model.loss terms changed within step {step}: {sorted(sums)} vs {sorted(terms)}")
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        if cfg.grad_clip is not None:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).detach().float()
        optimizer.step()
        return sums

    def _micro_batches(self, dataset: Dataset, sampler: EpochBatchSampler, state: _State, device: torch.device,
                       info: D.WorldInfo) -> Iterator[Any]:
        """Endless stream of device batches; ``state.epoch``/``batch_in_epoch`` track its position."""
        cfg = self.config
        # a dataset with ``indexes_batches`` (DictDataset, PairedDataset) is indexed with whole batches of
        # indices (no per-row collation); its arrays may
        # already live on the device, and fancy indexing makes a fresh tensor anyway: no pinning
        by_batch = {"sampler": sampler, "batch_size": None, "pin_memory": False} \
            if getattr(dataset, "indexes_batches", False) else {"batch_sampler": sampler, "pin_memory": device.type == "cuda"}
        while True:
            sampler.set_epoch(state.epoch, skip=state.batch_in_epoch)
            # a dedicated generator: creating the iterator must not draw from the global RNG
            gen = torch.Generator().manual_seed((cfg.seed + state.epoch) * 65_537 + info.rank)
            loader = DataLoader(dataset, **by_batch, collate_fn=self.collate_fn, num_workers=cfg.num_workers,
                                generator=gen)
            for batch in loader:
                state.batch_in_epoch += 1
                yield _to_device(batch, device)
            state.epoch += 1
            state.batch_in_epoch = 0

    @staticmethod
    def _check_finite(pending: list[tuple[int, float, dict[str, Tensor]]], last_path: Path | None,
                      last_saved_step: int | None) -> list[tuple[int, dict[str, float]]]:
        """Average the pending terms over ranks, move them to the host (one sync), raise on the first
        non-finite loss term; returns ``[(step, {"lr": ..., term: value})]``."""
        if not pending:
            return []
        keys = list(pending[0][2])
        for step, _, terms in pending:
            if list(terms) != keys:
                raise ValueError(f"model.loss terms changed at step {step}: {keys} vs {list(terms)}")
        stacked = torch.stack([torch.stack([terms[k] for k in keys]) for _, _, terms in pending])
        values = D.all_reduce_mean(stacked).cpu().tolist()
        out = []
        for (step, lr, _), row in zip(pending, values):
            rec = dict(zip(keys, row))
            losses = {k: v for k, v in rec.items() if k != "grad_norm"}
            if not all(math.isfinite(v) for v in losses.values()):
                terms_txt = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
                where = (f"{last_path} holds step {last_saved_step}" if last_path is not None and last_saved_step
                         else "no checkpoint was written")
                raise FloatingPointError(f"non-finite loss at step {step} ({terms_txt}); training stopped, {where}")
            out.append((step, {"lr": lr, **rec}))
        return out

    def _train_record(self, window: list[tuple[int, dict[str, float]]], state: _State, n_batches: int,
                      elapsed: float) -> dict[str, Any]:
        step, last = window[-1]
        rec: dict[str, Any] = {"kind": "train", "step": step, "epoch": _epochs_done(state, n_batches),
                               "lr": last["lr"]}
        for k in last:
            if k != "lr":
                rec[k] = sum(r[k] for _, r in window) / len(window)
        rec["elapsed"] = round(elapsed, 3)
        return rec

    def _eval_and_track(self, model: nn.Module, state: _State, n_batches: int, elapsed: float,
                        out_dir: Path | None, writer: Any, info: D.WorldInfo, final: bool = False) -> None:
        """Evaluate, log, keep ``best.pt``; sets ``state.stopped_early`` when patience runs out."""
        cfg = self.config
        metrics = self._evaluate(model) if info.rank == 0 else None
        metrics = D.broadcast_object(metrics)
        if cfg.monitor not in metrics:
            raise KeyError(f"monitor {cfg.monitor!r} is not among the evaluator's metrics {sorted(metrics)}")
        state.last_eval_step, state.last_metrics = state.step, metrics
        rec = {"kind": "eval", "step": state.step, "epoch": _epochs_done(state, n_batches),
               "elapsed": round(elapsed, 3), **metrics}
        state.history.append(rec)
        value = metrics[cfg.monitor]
        improved = math.isfinite(value) and (
            state.best_value is None or (value > state.best_value if cfg.mode == "max" else value < state.best_value))
        if improved:
            state.best_value, state.best_step, state.best_metrics, state.bad_evals = value, state.step, metrics, 0
        else:
            state.bad_evals += 1
        if info.rank == 0:
            log.info("step %d: %s%s", state.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                     " (best)" if improved else "")
            self._write_record(out_dir, writer, rec)
            if improved and cfg.keep_best and out_dir is not None:
                save_checkpoint({"format": CHECKPOINT_FORMAT, "kind": "best", "model": model.state_dict(),
                                 "step": state.step, "metrics": metrics, "config": cfg.to_dict()},
                                out_dir / "best.pt")
        patience = cfg.early_stopping_patience
        if patience is not None and state.bad_evals >= patience and not final:
            state.stopped_early = True
            if info.rank == 0:
                log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4g at step %s)",
                         state.step, cfg.monitor, state.bad_evals, state.best_value or float("nan"),
                         state.best_step)

    def _evaluate(self, model: Any) -> dict[str, float]:
        was_training = getattr(model, "training", False)
        if isinstance(model, nn.Module):
            model.eval()
        try:
            with torch.no_grad():
                metrics = self.evaluator(model)
        finally:
            if isinstance(model, nn.Module):
                model.train(was_training)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"evaluator must return a dict of floats, got {type(metrics).__name__}")
        return {str(k): float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------------ checkpoints and files

    def _save_last(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, state: _State, elapsed: float,
                   info: D.WorldInfo) -> None:
        rng = D.all_gather_objects(get_rng_state())  # collective: every rank takes part
        if info.rank != 0:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "kind": "last",
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": {**state.to_dict(), "seconds_before": elapsed},
            "rng": rng,
            "world_size": info.world_size,
            "config": self.config.to_dict(),
        }
        save_checkpoint(ckpt, path)

    def _restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, state: _State, info: D.WorldInfo) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != "last":
            raise ValueError(f"{path} is not a resumable checkpoint (kind={ckpt.get('kind')!r})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for k, v in ckpt["state"].items():
            setattr(state, k, v)
        old, new = {**ckpt["config"], "world_size": ckpt["world_size"]}, {**self.config.to_dict(),
                                                                           "world_size": info.world_size}
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in (*_TRAJECTORY_FIELDS, "world_size")
                   if old.get(k) != new[k]]
        if changed and info.rank == 0:
            log.warning("resuming %s with a different setup, the run will not match an uninterrupted one: %s",
                        path, "; ".join(changed))
        if len(ckpt["rng"]) > info.rank:
            set_rng_state(ckpt["rng"][info.rank])
        else:
            seed_everything(self.config.seed + info.rank + 1_000_003 * state.step)
        (log.info if info.rank == 0 else log.debug)("resuming from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch,
                 state.batch_in_epoch)

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
        """Keep the records up to ``step`` (later ones were written after the checkpoint); return them."""
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = [r for r in records if r["step"] <= step]
        from align.weights import write_file_atomically

        write_file_atomically(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
        return records

    @staticmethod
    def _write_record(out_dir: Path | None, writer: Any, rec: dict[str, Any]) -> None:
        if out_dir is not None:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if writer is not None:
            for k, v in rec.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    writer.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    @staticmethod
    def _tensorboard(out_dir: Path | None) -> Any:
        if out_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(str(out_dir / "tb"))

    # ------------------------------------------------------------------ setup helpers

    def _device(self, info: D.WorldInfo) -> torch.device:
        name = self.config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", info.local_rank if info.world_size > 1 else torch.cuda.current_device())
        return device

    def _use_bf16(self, device: torch.device) -> bool:
        precision = self.config.precision
        if device.type != "cuda":
            if precision == "bf16":
                log.warning("precision='bf16' needs a CUDA device; training in fp32 on %s", device)
            return False
        return precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())

    @staticmethod
    def _as_dataset(train_data: Any) -> Dataset:
        if isinstance(train_data, Mapping):
            return DictDataset(train_data)
        if isinstance(train_data, IterableDataset) or not isinstance(train_data, Dataset):
            raise TypeError(f"train_data must be a map-style Dataset of dict samples or a dict of arrays, "
                            f"got {type(train_data).__name__}")
        return train_data

    # ------------------------------------------------------------------ closed-form path

    def _fit_closed_form(self, model: Any, train_data: Any) -> TrainResult:
        cfg = self.config
        t0 = time.perf_counter()
        if getattr(model, "fit_input", "pair") == "batch":  # e.g. decision-level fusion: fit(inputs dict)
            batch = self._gather_all(train_data)
            log.info("fitting %s in closed form on %d samples (%s)", type(model).__name__,
                     len(next(iter(batch.values()))), ", ".join(sorted(batch)))
            model.fit(batch)
        else:
            modalities = getattr(model, "modalities", None)
            if modalities is None or len(modalities) != 2:
                raise TypeError(f"closed-form model {type(model).__name__} must define modalities=(a, b) "
                                f"(or fit_input = 'batch' to get the whole training dict), got {modalities!r}")
            X, Y = (self._gather(train_data, m) for m in modalities)
            log.info("fitting %s in closed form on %d samples (%s %s, %s %s)", type(model).__name__, len(X),
                     modalities[0], X.shape, modalities[1], Y.shape)
            model.fit(X, Y)
        metrics = self._evaluate(model) if self.evaluator is not None else None
        seconds = time.perf_counter() - t0
        history = []
        if metrics is not None:
            history.append({"kind": "eval", "step": 0, "epoch": 1.0, "elapsed": round(seconds, 3), **metrics})
            log.info("%s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if cfg.out_dir is not None and D.is_main_process():
            out_dir = Path(cfg.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        return TrainResult(history=history, best_metrics=metrics, best_step=0 if metrics else None,
                           final_metrics=metrics, train_seconds=seconds, n_trainable=0, steps=0)

    def _gather_all(self, train_data: Any) -> dict[str, Any]:
        """Every training array as numpy [N, ...] (lists stay lists), for models that fit on the whole dict."""
        if isinstance(train_data, Mapping):
            DictDataset(train_data)  # validates equal lengths
            return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else
                    (v if isinstance(v, list) else np.asarray(v)) for k, v in train_data.items()}
        dataset = self._as_dataset(train_data)
        if not getattr(dataset, "indexes_batches", False):
            raise TypeError(f"a model with fit_input='batch' needs a dict of arrays or a dataset that indexes "
                            f"batches, got {type(dataset).__name__}")
        batch = dataset[np.arange(len(dataset))]
        return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _gather(self, train_data: Any, modality: str) -> np.ndarray:
        """The full training array of one modality as numpy [N, ...]."""
        if isinstance(train_data, Mapping):
            if modality not in train_data:
                raise KeyError(f"train_data has no {modality!r} array (has {sorted(train_data)})")
            DictDataset(train_data)  # validates equal lengths
            v = train_data[modality]
            return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        dataset = self._as_dataset(train_data)
        if getattr(dataset, "indexes_batches", False):
            batch = dataset[np.arange(len(dataset))]
            if modality not in batch:
                raise KeyError(f"train_data samples have no {modality!r} field (have {sorted(batch)})")
            v = batch[modality]
            return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        loader = DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False, collate_fn=self.collate_fn,
                            num_workers=self.config.num_workers)
        parts = []
        for batch in loader:
            if modality not in batch:
                raise KeyError(f"train_data samples have no {modality!r} field (have {sorted(batch)})")
            v = batch[modality]
            parts.append(v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
        return np.concatenate(parts)
