"""What the Trainer optimises with: :class:`LossModule` (``forward == model.loss``, what DDP wraps), AdamW
parameter groups without weight decay on biases, norms and temperatures (:func:`param_groups`), the warm-up +
cosine schedule (:func:`warmup_cosine`) and the reading of what ``model.loss`` returns (:func:`split_loss`)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

# parameter names (last dotted component) that never get weight decay, whatever their shape
NO_DECAY_NAMES = frozenset({"logit_scale", "logit_bias"})


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


def split_loss(out: Tensor | Mapping[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
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


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay, torch's own schedulers, stepped once per optimiser step.

    Step ``s`` (0-based) runs at ``lr * (s + 1) / warmup_steps`` during warm-up (``LinearLR``; no step at lr 0),
    then ``CosineAnnealingLR`` from ``lr`` down to ``min_lr_ratio * lr`` at ``total_steps``.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup = min(warmup_steps, total_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=min_lr_ratio * lr)
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
