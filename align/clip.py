"""CLIP-style contrastive alignment (symmetric InfoNCE with a learnable temperature).

Two aligners share one objective, ``open_clip.loss.ClipLoss``:

* :class:`CLIPHeads` (registered ``"clip"``) — projection heads over *frozen* features
  (locked-tower tuning, as in LiT): image features ``[B, d_img]`` or a grid ``[B, P, d_img]``
  (mean- or attention-pooled) and text features ``[B, d_txt]`` are projected into one
  ``embed_dim`` space.
* :class:`CLIPTowers` (registered ``"clip_towers"``) — full open_clip towers (ViT or ResNet
  image tower, transformer text tower, open_clip's BPE tokenizer) trained end to end on
  images and captions.

Temperature. Both hold ``logit_scale`` (a log-scale, initialised to ``log(1/0.07)`` as in
open_clip). open_clip_train clamps the *parameter* in place to ``[0, ln 100]`` after every
optimiser step; here the shared Trainer owns the step, so the *value used in the loss* is
clamped instead (``logit_scale.clamp(0, ln 100).exp()``). The forward values are the same as
open_clip_train's; the one difference is that once the raw parameter has left the range its
gradient is zero, so it cannot be pulled back by the loss (the effective scale stays pinned at
100, or at 1 below the range).

Distributed training. ``set_distributed(rank, world_size)`` (called by the Trainer before
training, with ``(0, 1)`` in a single process) rebuilds the ``ClipLoss`` with that rank and world
size, so features are gathered across processes (``local_loss`` / ``gather_with_grad`` as in
open_clip_train; with ``gather_with_grad=True`` the DDP-averaged gradient equals the
single-process gradient on the global batch).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import AttentionalPooler
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from align.base import ALIGNERS, GradientAligner

log = logging.getLogger(__name__)

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0

# A small ViT-CLIP for CPU experiments and the benchmark: 64 px, 4+4 layers of width 128, 8.0 M parameters
# (6.3 M of them the token embedding).
TINY_VIT_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def _clamped_scale(logit_scale: Tensor, max_scale: float) -> Tensor:
    """``exp(logit_scale)`` with the log-scale clamped to ``[0, ln max_scale]`` (open_clip_train's range)."""
    return logit_scale.clamp(0.0, math.log(max_scale)).exp()


def _make_head(in_dim: int, out_dim: int, kind: str, hidden_dim: int | None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = hidden_dim or in_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ValueError(f"head must be 'linear' or 'mlp', got {kind!r}")


class _ContrastiveMixin:
    """The ClipLoss plumbing, ``forward`` and ``loss`` shared by both CLIP aligners (each defines
    ``encode(modality, x)`` and ``scale``)."""

    local_loss: bool
    gather_with_grad: bool
    clip_loss: ClipLoss

    def _build_loss(self, rank: int = 0, world_size: int = 1) -> None:
        self.clip_loss = ClipLoss(
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def forward(self, image: Tensor, text: Tensor | Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``(image_emb [B, D], text_emb [B, D], scale [])`` — the arguments of ``ClipLoss``."""
        return self.encode("image", image), self.encode("text", text), self.scale

    def loss(self, batch: dict) -> Tensor:
        """Symmetric InfoNCE over the pairs ``batch["image"][i] ↔ batch["text"][i]``."""
        image, text = batch["image"], batch["text"]
        if len(image) != len(text):
            raise ValueError(f"batch has {len(image)} images but {len(text)} texts")
        return self.clip_loss(*self(image, text))

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Rebuild the ``ClipLoss`` for ``world_size`` processes (this one being ``rank``)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self._build_loss(rank, world_size)


@ALIGNERS.register("clip")
class CLIPHeads(_ContrastiveMixin, GradientAligner):
    """CLIP heads over frozen features: image ``[B, d_img]`` / ``[B, P, d_img]`` and text ``[B, d_txt]`` → ``[B, D]``.

    Args:
        image_dim, text_dim: feature sizes of the frozen encoders.
        embed_dim: size of the shared space.
        head: ``"linear"`` or ``"mlp"`` (Linear → GELU → Linear) for both modalities.
        hidden_dim: hidden width of the MLP heads (default: the input size).
        pool: how a grid ``[B, P, d_img]`` becomes ``[B, d_img]``: ``"mean"`` (also accepts pooled
            ``[B, d_img]`` input) or ``"attention"`` (one learned query, open_clip's
            ``AttentionalPooler``; needs grid input).
        attn_heads: heads of the attention pool (must divide ``image_dim``).
        init_logit_scale: initial log-temperature, ``log(1/0.07)``.
        max_logit_scale: the scale is clamped at this value (100, as open_clip_train).
        local_loss, gather_with_grad: ``ClipLoss`` options, used when ``set_distributed`` gives
            a world size above 1.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int = 256,
        head: str = "linear",
        hidden_dim: int | None = None,
        pool: str = "mean",
        attn_heads: int = 8,
        init_logit_scale: float = INIT_LOGIT_SCALE,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        local_loss: bool = False,
        gather_with_grad: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "attention"):
            raise ValueError(f"pool must be 'mean' or 'attention', got {pool!r}")
        if pool == "attention" and image_dim % attn_heads:
            raise ValueError(f"attn_heads={attn_heads} must divide image_dim={image_dim}")
        self.image_dim, self.text_dim, self.embed_dim = image_dim, text_dim, embed_dim
        self.head, self.hidden_dim, self.pool = head, hidden_dim, pool
        self.max_logit_scale = max_logit_scale
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad

        self.image_pool = (
            AttentionalPooler(image_dim, image_dim, n_head=attn_heads, n_queries=1) if pool == "attention" else None
        )
        self.image_head = _make_head(image_dim, embed_dim, head, hidden_dim)
        self.text_head = _make_head(text_dim, embed_dim, head, hidden_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self._build_loss()

    def _pool(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            if x.shape[-1] != self.image_dim:
                raise ValueError(f"image grid has feature size {x.shape[-1]}, expected image_dim={self.image_dim}")
            if self.image_pool is None:
                return x.mean(dim=1)
            return self.image_pool(x).squeeze(1)
        if x.dim() == 2:
            if self.image_pool is not None:
                raise ValueError(
                    f"pool='attention' needs grid image features [B, P, {self.image_dim}], got {tuple(x.shape)}"
                )
            if x.shape[-1] != self.image_dim:
                raise ValueError(f"image features have size {x.shape[-1]}, expected image_dim={self.image_dim}")
            return x
        raise ValueError(f"image features must be [B, d] or [B, P, d], got shape {tuple(x.shape)}")

    def encode(self, modality: str, x: Tensor) -> Tensor:
        """L2-normalised embeddings ``[N, embed_dim]`` of image features or text features."""
        self._check_modality(modality)
        if modality == "image":
            return F.normalize(self.image_head(self._pool(x)), dim=-1)
        if x.dim() != 2 or x.shape[-1] != self.text_dim:
            raise ValueError(f"text features must be [B, {self.text_dim}], got shape {tuple(x.shape)}")
        return F.normalize(self.text_head(x), dim=-1)

    @property
    def scale(self) -> Tensor:
        """The temperature actually used: ``exp(logit_scale)`` clamped to ``[1, max_logit_scale]``."""
        return _clamped_scale(self.logit_scale, self.max_logit_scale)


@ALIGNERS.register("clip_towers")
class CLIPTowers(_ContrastiveMixin, GradientAligner):
    """Full open_clip image and text towers trained contrastively (from scratch or a local checkpoint).

    Build either from a config (``embed_dim``, ``vision_cfg``, ``text_cfg`` dicts as in open_clip's
    model JSONs; default :data:`TINY_VIT_CONFIG`) or by open_clip model name with
    ``pretrained=None`` (random init), a local checkpoint path, or a hub tag if you have the hub.

    Batch: ``"image"`` float ``[B, 3, H, W]`` normalised (see :meth:`preprocess`; uint8
    ``[B, H, W, 3]`` is preprocessed on the fly) and ``"text"`` token ids ``[B, L]`` (see
    :meth:`tokenize`; a list of strings is tokenised on the fly).
    """

    inputs = {"image": "pixels", "text": "raw"}
    auto_inputs = ()

    @classmethod
    def from_inputs(cls, dims, **kwargs) -> "CLIPTowers":
        """Towers read pixels and strings themselves: no feature sizes needed."""
        return cls(**kwargs)

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        embed_dim: int | None = None,
        vision_cfg: dict | None = None,
        text_cfg: dict | None = None,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        local_loss: bool = False,
        gather_with_grad: bool = False,
    ) -> None:
        super().__init__()
        self.model_name, self.pretrained = model_name, pretrained
        self.max_logit_scale = max_logit_scale
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        if model_name is not None:
            if embed_dim is not None or vision_cfg is not None or text_cfg is not None:
                raise ValueError("give either model_name or (embed_dim, vision_cfg, text_cfg), not both")
            self.model = open_clip.create_model(model_name, pretrained=pretrained)
            self._check_no_logit_bias()
            # SimpleTokenizer (bundled BPE vocab, offline) for OpenAI-style models; models whose config
            # names a Hugging Face tokenizer (e.g. mt5/roberta text towers) fetch it from the hub
            self.tokenizer = open_clip.get_tokenizer(model_name)
        else:
            if pretrained is not None:
                raise ValueError("pretrained needs model_name (a config-built model starts from random weights)")
            embed_dim = TINY_VIT_CONFIG["embed_dim"] if embed_dim is None else embed_dim
            vision_cfg = dict(TINY_VIT_CONFIG["vision_cfg"] if vision_cfg is None else vision_cfg)
            text_cfg = dict(TINY_VIT_CONFIG["text_cfg"] if text_cfg is None else text_cfg)
            if text_cfg.get("hf_tokenizer_name"):
                raise ValueError("config-built CLIPTowers uses open_clip's SimpleTokenizer; drop hf_tokenizer_name")
            self.model = open_clip.CLIP(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
            self.tokenizer = SimpleTokenizer(context_length=self.model.context_length)
            vocab = int(text_cfg.get("vocab_size", 49408))
            if vocab < self.tokenizer.vocab_size:
                raise ValueError(
                    f"text_cfg vocab_size={vocab} is smaller than the tokenizer's {self.tokenizer.vocab_size} tokens"
                )
        self._build_loss()

    def _check_no_logit_bias(self) -> None:
        if getattr(self.model, "logit_bias", None) is not None:
            raise ValueError(f"{self.model_name} has a logit_bias (SigLIP); it needs SigLipLoss, not ClipLoss")

    # ---- inputs ---------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``[N, context_length]`` (long) of ``texts`` with the model's open_clip tokenizer."""
        if isinstance(texts, str):
            raise ValueError("tokenize expects a list of strings, got one string")
        return self.tokenizer(list(texts), context_length=self.context_length)

    def preprocess(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 images ``[B, H, W, 3]`` → normalised float ``[B, 3, S, S]`` as open_clip's eval transform.

        Resize the shorter side to the model's image size (bicubic, antialiased), centre-crop,
        normalise with the model's mean/std (OpenAI's by default).
        """
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"preprocess expects uint8 images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        h, w = self.image_size
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != (h, w):
            x = TF.resize(x, [min(h, w)], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp_(0.0, 1.0)
            x = TF.center_crop(x, [h, w])
        return TF.normalize(x, mean, std)

    def _image_input(self, x: Tensor | np.ndarray) -> Tensor:
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:
            x = self.preprocess(x)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be float [B, 3, H, W] (or uint8 [B, H, W, 3]), got {tuple(x.shape)}")
        return x.to(self.model.logit_scale.device)

    def _text_input(self, t: Tensor | Sequence[str]) -> Tensor:
        if not isinstance(t, Tensor):
            t = self.tokenize(t)
        if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"text must be token ids [B, L] (int) or a list of strings, got {t.dtype} {tuple(t.shape)}"
            )
        return t.to(self.model.logit_scale.device)

    # ---- aligner ---------------------------------------------------------------------------
    def encode(self, modality: str, x: Tensor | Sequence[str]) -> Tensor:
        """L2-normalised embeddings ``[N, embed_dim]`` of images or token ids / strings."""
        self._check_modality(modality)
        if modality == "image":
            return self.model.encode_image(self._image_input(x), normalize=True)
        return self.model.encode_text(self._text_input(x), normalize=True)

    @property
    def scale(self) -> Tensor:
        """The temperature actually used: ``exp(logit_scale)`` clamped to ``[1, max_logit_scale]``."""
        return _clamped_scale(self.model.logit_scale, self.max_logit_scale)
