"""open_clip towers as frozen encoders: ``open_clip_image`` and ``open_clip_text`` (any open_clip model)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from experiments.encoders import (
    ENCODERS,
    Features,
    FrozenEncoder,
    ImageInput,
    TextInput,
    _check_texts,
    _file_tag,
    _images_to_uint8,
)

log = logging.getLogger(__name__)


def _open_clip(model: str | Mapping[str, Any], pretrained: str | None, seed: int,
               device: torch.device) -> tuple[nn.Module, Callable, Callable, str]:
    """(model, eval image transform, tokenizer, cache-key stem) for an open_clip model.

    ``model`` is a built-in config name (``"ViT-B-32"``) or a config dict (``embed_dim``,
    ``vision_cfg``, ``text_cfg``); ``pretrained`` is ``None`` (random init from ``seed``), a local
    checkpoint file or, for a built-in name, a hub tag (which open_clip downloads).
    """
    import open_clip

    if pretrained is not None and os.path.isfile(pretrained):
        weights_tag = _file_tag(Path(pretrained))
    elif pretrained is not None:
        if not isinstance(model, str):
            raise ValueError(f"with a config dict, pretrained must be a checkpoint file; {pretrained!r} is not a file")
        weights_tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", pretrained)
    else:
        weights_tag = f"random-s{seed}"
        log.warning("open_clip model %s has no pretrained weights: its features are random (seed %d)",
                    model if isinstance(model, str) else "(config dict)", seed)

    # Random init draws from the global RNG: fork it so that building a model is reproducible and
    # leaves the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, str):
            clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(model)
            stem = f"open_clip-{model}"
        else:
            cfg = copy.deepcopy(dict(model))
            custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
            clip = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
            if pretrained is not None:
                open_clip.load_checkpoint(clip, pretrained)
            clip.to(device)
            pp = open_clip.get_model_preprocess_cfg(clip)
            preprocess = open_clip.image_transform(
                pp.get("size", clip.visual.image_size), is_train=False, mean=pp.get("mean"), std=pp.get("std"),
                interpolation=pp.get("interpolation"), resize_mode=pp.get("resize_mode"))
            if "hf_tokenizer_name" in cfg.get("text_cfg", {}):
                from open_clip.tokenizer import HFTokenizer

                tokenizer = HFTokenizer(cfg["text_cfg"]["hf_tokenizer_name"], context_length=clip.context_length)
            else:
                tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
            digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]
            stem = f"open_clip-cfg{digest}"
    clip.eval().requires_grad_(False)
    return clip, preprocess, tokenizer, f"{stem}-{weights_tag}"


@ENCODERS.register("open_clip_image")
class OpenClipImageEncoder(FrozenEncoder):
    """The image tower of any open_clip model (see :func:`_open_clip` for ``model``/``pretrained``).

    ``pooled`` [N, embed_dim] float32 is ``model.encode_image`` (not normalised); for ViT towers
    also ``grid`` [N, L, width] float16: the last block's patch tokens after ``ln_post`` (no class
    token, no projection). Images are preprocessed by open_clip's own eval transform (PIL).
    """

    modality = "image"

    def __init__(self, model_name: str | Mapping[str, Any] = "ViT-B-32", pretrained: str | None = None,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        from open_clip.transformer import VisionTransformer

        self.model_name = model_name
        self.pretrained = pretrained
        self.seed = seed
        self.device = torch.device(device)
        clip, self.preprocess, _, stem = _open_clip(model_name, pretrained, seed, self.device)
        self.visual = clip.visual
        self.name = f"{stem}-image"
        has_grid = isinstance(self.visual, VisionTransformer)
        self.kinds = ("pooled", "grid") if has_grid else ("pooled",)
        self.default_kinds = self.kinds
        size = self.visual.image_size
        probe = self.encode(np.zeros((1, *(size if isinstance(size, tuple) else (size, size)), 3), np.uint8))
        self.dims = {k: v.shape[-1] for k, v in probe.items()}

    def encode(self, images: ImageInput, kinds: Sequence[str] | None = None) -> Features:
        """``images`` uint8 [N, H, W, 3] or PIL list → ``{"pooled": [N, D], "grid": [N, L, width]}``."""
        from PIL import Image

        kinds = self.check_kinds(kinds)
        arr = _images_to_uint8(images)
        x = torch.stack([self.preprocess(Image.fromarray(a)) for a in arr]).to(self.device)
        with torch.inference_mode():
            if "grid" in kinds:
                res = self.visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC")
                pooled, grid = res["image_features"], res["image_intermediates"][-1]
            else:
                pooled, grid = self.visual(x), None
            out: Features = {}
            if "pooled" in kinds:
                out["pooled"] = pooled.float().cpu().numpy()
            if grid is not None:
                out["grid"] = grid.to(torch.float16).cpu().numpy()
        return out


@ENCODERS.register("open_clip_text")
class OpenClipTextEncoder(FrozenEncoder):
    """The text tower of any open_clip model, with open_clip's tokenizer for that model.

    ``pooled`` [N, embed_dim] float32 is ``model.encode_text`` (not normalised).
    """

    modality = "text"
    kinds = ("pooled",)
    default_kinds = ("pooled",)

    def __init__(self, model_name: str | Mapping[str, Any] = "ViT-B-32", pretrained: str | None = None,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.model_name = model_name
        self.pretrained = pretrained
        self.seed = seed
        self.device = torch.device(device)
        self.model, _, self.tokenizer, stem = _open_clip(model_name, pretrained, seed, self.device)
        self.model.visual = None  # the image tower is not used here; free its memory
        self.name = f"{stem}-text"
        self.dims = {"pooled": self.encode(["a"])["pooled"].shape[-1]}

    def encode(self, texts: TextInput, kinds: Sequence[str] | None = None) -> Features:
        """``texts`` list of N str → ``{"pooled": [N, D]}``."""
        self.check_kinds(kinds)
        tokens = self.tokenizer(_check_texts(texts)).to(self.device)
        with torch.inference_mode():
            return {"pooled": self.model.encode_text(tokens).float().cpu().numpy()}
