"""The Trainer's config and result: :class:`TrainConfig` (plain types, stored in every checkpoint) and
:class:`TrainResult` (what :meth:`experiments.trainer.Trainer.fit` returns)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.config import TrainSection

CHECKPOINT_FORMAT = 1
# config fields that change the optimisation trajectory: a resume with other values is not exact
TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "grad_clip",
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
