"""Cycle-consistent autoencoders around a shared latent, trainable on partially paired data.

Each modality ``m`` has an MLP encoder ``E_m: R^{d_m} -> R^D`` and decoder ``D_m: R^D -> R^{d_m}``.
For a batch with features ``x`` (modality 0) and ``y`` (modality 1) the terms are

* ``recon``        ``|D_x(E_x x) - x|² + |D_y(E_y y) - y|²``                      (all rows)
* ``cycle``        ``|D_x(E_y(D_y(E_x x))) - x|² + |D_y(E_x(D_x(E_y y))) - y|²``  (all rows)
* ``translation``  ``|D_y(E_x x) - y|² + |D_x(E_y y) - x|²``                       (paired rows)
* ``align``        InfoNCE (open_clip ``ClipLoss``) on the L2-normalised latents, or the
  MSE between latents (``alignment="mse"``)                                       (paired rows)

(squared errors are means over elements). ``batch["paired"]`` (bool [B]) marks which rows
are true pairs; without it every row is paired. Rows not marked paired only train the
within-modality terms, so their x and y rows need not (and, with :func:`partially_paired`,
do not) correspond. When a batch has no paired rows, ``translation`` and ``align`` are
reported as 0 and left out of the total ``loss``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.base import ALIGNERS, GradientAligner

log = logging.getLogger(__name__)


def _mlp(d_in: int, hidden: Sequence[int], d_out: int, dropout: float) -> nn.Module:
    """Linear → LayerNorm → GELU blocks, then a plain Linear to ``d_out``."""
    from torchvision.ops import MLP  # imported here: torchvision adds seconds to ``import align``

    return MLP(d_in, [*hidden, d_out], norm_layer=nn.LayerNorm, activation_layer=nn.GELU, dropout=dropout)


@ALIGNERS.register("cycle_ae")
class CycleAE(GradientAligner):
    """Two autoencoders sharing a latent space, tied by translation, cycle and alignment losses.

    Args:
        input_dims: feature size per modality, ``{"image": 1280, "text": 384}`` (its keys become
            ``modalities``), or a pair ``(d_x, d_y)`` for ``modalities``.
        latent_dim: size ``D`` of the shared latent.
        hidden: hidden layer sizes of each encoder (decoders use them reversed).
        dropout: dropout after each hidden layer.
        recon_weight, cycle_weight, translation_weight, align_weight: weights of the loss terms.
        alignment: ``"infonce"`` (open_clip ``ClipLoss`` with a learnable temperature) or ``"mse"``.
        init_temperature: initial softmax temperature of the InfoNCE term (CLIP's 0.07).
        normalize_embeddings: ``encode`` returns L2-normalised latents (the space the InfoNCE term
            aligns); set False to get the raw latents that the decoders read.
        modalities: names of the two modalities when ``input_dims`` is a pair.
    """

    auto_inputs: ClassVar[tuple[str, ...]] = ("input_dims",)

    @classmethod
    def from_inputs(cls, dims: Mapping[str, int], **kwargs: Any) -> "CycleAE":
        """Build from the feature size of each modality (the batch keys of ``inputs``)."""
        modalities = tuple(kwargs.pop("modalities", ("image", "text")))
        return cls({m: dims[m] for m in modalities}, **kwargs)

    def __init__(
        self,
        input_dims: Mapping[str, int] | Sequence[int],
        latent_dim: int = 128,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.0,
        recon_weight: float = 1.0,
        cycle_weight: float = 1.0,
        translation_weight: float = 1.0,
        align_weight: float = 1.0,
        alignment: str = "infonce",
        init_temperature: float = 0.07,
        normalize_embeddings: bool = True,
        modalities: Sequence[str] = ("image", "text"),
    ) -> None:
        super().__init__()
        if isinstance(input_dims, Mapping):
            modalities, dims = tuple(input_dims), tuple(int(d) for d in input_dims.values())
        else:
            dims = tuple(int(d) for d in input_dims)
        if len(dims) != 2 or len(modalities) != 2 or modalities[0] == modalities[1]:
            raise ValueError(f"CycleAE needs two distinct modalities with one input size each, "
                             f"got modalities={tuple(modalities)} and input_dims={input_dims!r}")
        if min(dims) < 1 or latent_dim < 1:
            raise ValueError(f"input_dims and latent_dim must be positive, got {dims} and {latent_dim}")
        if alignment not in ("infonce", "mse"):
            raise ValueError(f"alignment must be 'infonce' or 'mse', got {alignment!r}")
        self.modalities = tuple(modalities)
        self.input_dims = dict(zip(self.modalities, dims))
        self.latent_dim = latent_dim
        self.weights = {"recon": recon_weight, "cycle": cycle_weight,
                        "translation": translation_weight, "align": align_weight}
        self.alignment = alignment
        self.normalize_embeddings = normalize_embeddings
        hidden = tuple(hidden)
        self.encoders = nn.ModuleDict({m: _mlp(d, hidden, latent_dim, dropout) for m, d in self.input_dims.items()})
        self.decoders = nn.ModuleDict({m: _mlp(latent_dim, hidden[::-1], d, dropout)
                                       for m, d in self.input_dims.items()})
        if alignment == "infonce":
            from open_clip.loss import ClipLoss

            self.clip_loss = ClipLoss()
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def latent(self, modality: str, x: Tensor) -> Tensor:
        """Raw shared latent [N, D] of ``x`` [N, d_modality] (what the decoders read)."""
        self._check_modality(modality)
        d = self.input_dims[modality]
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"CycleAE {modality!r} features must be [N, {d}], got {tuple(x.shape)}")
        return self.encoders[modality](x)

    def decode(self, modality: str, z: Tensor) -> Tensor:
        """Features [N, d_modality] of ``modality`` decoded from latents ``z`` [N, D]."""
        self._check_modality(modality)
        return self.decoders[modality](z)

    def encode(self, modality: str, x: Tensor) -> Tensor:
        """Embedding [N, D] of ``x`` [N, d_modality]: the latent, L2-normalised if ``normalize_embeddings``."""
        z = self.latent(modality, x)
        return F.normalize(z, dim=-1) if self.normalize_embeddings else z

    def translate(self, source: str, x: Tensor) -> Tensor:
        """Features of the other modality [N, d_other] decoded from ``source`` features ``x``."""
        other = self.modalities[1] if source == self.modalities[0] else self.modalities[0]
        return self.decode(other, self.latent(source, x))

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Named loss terms and their weighted sum ``"loss"`` (see the module docstring)."""
        mx, my = self.modalities
        for m in (mx, my):
            if m not in batch:
                raise KeyError(f"CycleAE.loss needs batch[{m!r}]; the batch has {sorted(batch)}")
        x, y = batch[mx], batch[my]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch[{mx!r}] has {x.shape[0]} rows but batch[{my!r}] has {y.shape[0]}")
        paired = batch.get("paired")
        if paired is None:
            paired = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            paired = torch.as_tensor(paired, device=x.device)
            if paired.dtype != torch.bool or paired.shape != (x.shape[0],):
                raise ValueError(f"batch['paired'] must be a bool tensor of shape [{x.shape[0]}], "
                                 f"got {paired.dtype} {tuple(paired.shape)}")

        zx, zy = self.latent(mx, x), self.latent(my, y)
        x_to_y, y_to_x = self.decode(my, zx), self.decode(mx, zy)  # translations
        terms = {
            "recon": F.mse_loss(self.decode(mx, zx), x) + F.mse_loss(self.decode(my, zy), y),
            "cycle": F.mse_loss(self.decode(mx, self.latent(my, x_to_y)), x)
            + F.mse_loss(self.decode(my, self.latent(mx, y_to_x)), y),
        }
        n_paired = int(paired.sum())
        if n_paired > 0:
            terms["translation"] = F.mse_loss(x_to_y[paired], y[paired]) + F.mse_loss(y_to_x[paired], x[paired])
            if self.alignment == "infonce":
                scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on 1/temperature
                terms["align"] = self.clip_loss(F.normalize(zx[paired], dim=-1), F.normalize(zy[paired], dim=-1),
                                                scale)
            else:
                terms["align"] = F.mse_loss(zx[paired], zy[paired])
        total = sum(self.weights[k] * v for k, v in terms.items())
        zero = x.new_zeros(())
        terms.setdefault("translation", zero)
        terms.setdefault("align", zero)
        terms["loss"] = total
        return terms

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, latent_dim={self.latent_dim}, alignment={self.alignment!r}, "
                f"weights={self.weights}")


def make_pairing_mask(n: int, ratio: float, seed: int = 0) -> Tensor:
    """Bool [n] with exactly ``round(ratio * n)`` True entries at seeded random positions."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(ratio * n)]] = True
    return mask


def partially_paired(
    x: Tensor, y: Tensor, ratio: float, seed: int = 0, modalities: Sequence[str] = ("image", "text")
) -> dict[str, Tensor]:
    """A training set where only a ``ratio`` of the (x[i], y[i]) pairs are known to be pairs.

    Returns ``{modalities[0]: x, modalities[1]: y', "paired": mask}`` (all [n, ...]), where ``mask``
    is :func:`make_pairing_mask` and the rows of ``y`` at unpaired positions are permuted among
    themselves with no fixed point (a cyclic shift of a random order), so an unpaired row of
    ``y'`` never sits next to its true partner and the model cannot learn from that pairing.
    The dict is directly a ``Trainer`` training set (equal-length tensors).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    mask = make_pairing_mask(len(x), ratio, seed)
    unpaired = torch.nonzero(~mask).flatten()
    g = torch.Generator().manual_seed(seed + 1)
    order = unpaired[torch.randperm(len(unpaired), generator=g)]
    index = torch.arange(len(y))
    index[order] = order.roll(1)  # a derangement of the unpaired rows when there are >= 2
    return {modalities[0]: x, modalities[1]: y[index], "paired": mask}
