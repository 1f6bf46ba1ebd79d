"""The aligner interface shared by every method in ``align``.

An aligner puts two modalities into one shared space:

* ``encode(modality, x) -> Tensor[N, D]`` for each of its two ``modalities``;
* gradient aligners (``nn.Module``) expose ``loss(batch) -> Tensor | dict[str, Tensor]``,
  where ``batch`` is a dict keyed by modality name; the shared Trainer optimises it;
* closed-form aligners (CCA) expose ``fit(x, y)`` / ``transform(x, y)`` in the
  scikit-learn way; the Trainer calls ``fit`` on the whole training set.

The Trainer and evaluators only use this interface, never an aligner's name.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from align.registry import Registry

#: every module of ``align`` that names ``ALIGNERS`` is imported on the first lookup (see :mod:`align.registry`),
#: so a new aligner file needs only its ``@ALIGNERS.register("name")`` line
ALIGNERS: Registry = Registry("aligner", package="align", symbol="ALIGNERS")


def build_aligner(name: str, **cfg) -> "Aligner":
    """Build a registered aligner by name (``cca``, ``clip``, ``devise``, ...)."""
    return ALIGNERS.build(name, **cfg)


@runtime_checkable
class Aligner(Protocol):
    modalities: tuple[str, str]

    def encode(self, modality: str, x: Tensor) -> Tensor: ...


class InputSpec:
    """What an aligner takes, declared so experiments can feed any aligner without knowing its name.

    ``inputs`` maps each batch key to the kind of input it expects: ``"vector"`` (a feature
    vector [N, d]), ``"grid"`` (patch features [N, P, d]), ``"pixels"`` (uint8 images
    [N, H, W, 3]), ``"graph"`` (caption graphs, :mod:`align.graphs`), ``"raw"`` (strings) or
    ``"class"`` (int labels; the aligner then also gets ``class_embeddings`` [C, d_text]).
    :meth:`from_inputs` builds the aligner from the dimensions of those inputs; the constructor
    arguments it fills itself are listed in ``auto_inputs``.
    """

    inputs: ClassVar[dict[str, str]] = {"image": "vector", "text": "vector"}
    auto_inputs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_inputs(cls, dims: Mapping[str, int], **kwargs: Any):
        """Build from ``dims`` (feature size per batch key of ``inputs``) and config ``kwargs``."""
        return cls(**kwargs)


class GradientAligner(InputSpec, nn.Module):
    """Base class for aligners trained by gradient descent through the Trainer."""

    modalities: tuple[str, str] = ("image", "text")
    auto_inputs: ClassVar[tuple[str, ...]] = ("image_dim", "text_dim")

    @classmethod
    def from_inputs(cls, dims: Mapping[str, int], **kwargs: Any):
        return cls(image_dim=dims["image"], text_dim=dims["text"], **kwargs)

    def encode(self, modality: str, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: dict) -> Tensor | dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(
                f"{type(self).__name__} encodes {self.modalities}, not {modality!r}"
            )

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def is_closed_form(model: object) -> bool:
    """True for aligners fitted in closed form (``fit`` and no ``loss``)."""
    return hasattr(model, "fit") and not hasattr(model, "loss")


@torch.no_grad()
def encode_in_batches(model: Aligner, modality: str, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Encode ``x`` [N, ...] with ``model.encode`` in chunks; returns [N, D] on CPU."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    outs = [model.encode(modality, x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    if isinstance(model, nn.Module) and was_training:
        model.train()
    return torch.cat(outs) if outs else torch.empty(0)
