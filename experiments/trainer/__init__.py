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

Modules: :mod:`~experiments.trainer.config` (``TrainConfig``, ``TrainResult``), :mod:`~experiments.trainer.data`
(``DictDataset``, ``EpochBatchSampler``), :mod:`~experiments.trainer.optim` (``LossModule``, ``param_groups``,
the schedule), :mod:`~experiments.trainer.loop` (``Trainer``), :mod:`~experiments.trainer.checkpointing`
(``last.pt``, ``metrics.jsonl``) and :mod:`~experiments.trainer.closed_form` (``fit`` without ``loss``).
"""
from __future__ import annotations

from experiments.trainer.config import CHECKPOINT_FORMAT, TrainConfig, TrainResult
from experiments.trainer.data import DictDataset, EpochBatchSampler
from experiments.trainer.loop import Evaluator, Trainer
from experiments.trainer.optim import NO_DECAY_NAMES, LossModule, param_groups, warmup_cosine

__all__ = ["CHECKPOINT_FORMAT", "DictDataset", "EpochBatchSampler", "Evaluator", "LossModule", "NO_DECAY_NAMES",
           "TrainConfig", "TrainResult", "Trainer", "param_groups", "warmup_cosine"]
