"""The training loop: :class:`Trainer` (gradient path here; checkpoints and files in
:mod:`experiments.trainer.checkpointing`, the closed-form path in :mod:`experiments.trainer.closed_form`)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from align.base import is_closed_form
from experiments import distributed as D
from experiments.checkpoint import save_checkpoint, seed_everything
from experiments.trainer.checkpointing import CheckpointMixin, _epochs_done, _State, _StopOnSigint
from experiments.trainer.closed_form import ClosedFormMixin
from experiments.trainer.config import CHECKPOINT_FORMAT, TrainConfig, TrainResult
from experiments.trainer.data import EpochBatchSampler, as_dataset, to_device
from experiments.trainer.optim import LossModule, param_groups, split_loss, warmup_cosine

log = logging.getLogger("experiments.trainer")

Evaluator = Callable[[Any], Mapping[str, float]]


class Trainer(CheckpointMixin, ClosedFormMixin):
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
        """Linear warm-up then cosine decay (:func:`experiments.trainer.optim.warmup_cosine`), stepped once per
        optimiser step."""
        return warmup_cosine(optimizer, total_steps, self.config.warmup_steps, self.config.lr,
                             self.config.min_lr_ratio)

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
                total, terms = split_loss(out, step)
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
                yield to_device(batch, device)
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
        return as_dataset(train_data)
