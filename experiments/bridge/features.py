"""Data and features of a bridge run: images with captions, frozen vision tokens, the LM, the caption sets.

The images and captions are ShapesWorld scenes (``data.name: shapesworld``, with the scene metadata the
attribute, hard-negative and VQA evaluations use) or any image–caption set :mod:`experiments.views` loads
(``csv``, ``karpathy``, a registered loader returning ``ImageTextData``), adapted to a :class:`CaptionSet`
(``scenes`` and ``hard_negatives`` None: those evaluations are skipped).
:func:`prepare` returns a :class:`BridgeData` (nothing mutates it later). Vision tokens are the frozen
encoder's grid, average-pooled to ``vision.tokens`` tokens (:func:`pool_grid`; 16 → 4 makes every
sequence 12 positions shorter). :class:`VisionTower` applies the same encoder and pooling to raw
images (what :func:`experiments.ask.load_bridge` attaches for ``chat``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from align.llm import load_llm, low_precision_linears, tiny_llm
from align.mllm_data import ImageCaptionDataset, caption_leading_space
from align.seeding import caption_vocabulary
from experiments.bridge.config import Config
from experiments.data._common import CaptionedSplits
from experiments.data.shapesworld import load_shapesworld
from experiments.data.vqa import PHRASINGS
from experiments.features import FeatureCache, build_encoder, extract_features

log = logging.getLogger(__name__)


def pool_grid(grid: np.ndarray, tokens: int | None) -> np.ndarray:
    """Average-pool a square grid ``[B, N, d]`` (N = s²) to ``tokens`` (= t², t divides s) tokens, float32."""
    grid = np.asarray(grid, dtype=np.float32)
    if tokens is None or tokens == grid.shape[1]:
        return grid
    s, t = round(grid.shape[1] ** 0.5), round(tokens ** 0.5)
    if s * s != grid.shape[1] or t * t != tokens or s % t:
        raise ValueError(f"cannot pool a grid of {grid.shape[1]} tokens to {tokens} (square grids, t divides s)")
    k = s // t
    x = grid.reshape(len(grid), t, k, t, k, grid.shape[-1])
    return x.mean(axis=(2, 4)).reshape(len(grid), tokens, grid.shape[-1])


def vision_encoder(encoder: str, options: dict[str, Any], image_size: int):
    """The frozen image encoder; it must give grid (token) features."""
    options = dict(options)
    if encoder == "mobilenet_v2":
        options.setdefault("image_size", image_size)
    enc = build_encoder(encoder, **options)
    if "grid" not in enc.kinds:
        raise ValueError(f"vision.encoder {encoder!r} ({enc.name}) gives no grid features, only {list(enc.kinds)}; "
                         "connectors need feature tokens (open_clip: use a ViT model)")
    return enc


class VisionTower:
    """Raw images (uint8 ``[B, H, W, 3]`` or a list of arrays) → pooled grid tokens ``[B, M, d_v]`` (float32)."""

    def __init__(self, encoder: Any, tokens: int | None) -> None:
        self.encoder, self.tokens = encoder, tokens

    def __call__(self, images: Any) -> torch.Tensor:
        grid = self.encoder.encode(images, kinds=("grid",))["grid"]
        return torch.from_numpy(pool_grid(grid, self.tokens))


@dataclass(frozen=True)
class CaptionSet(CaptionedSplits):
    """An image–caption set without scene metadata, with what the bridge reads of a ShapesWorld: ``captions``
    (one list per image), ``splits`` (train/val/test rows), ``flat_captions(split)``, ``images`` (uint8
    ``[N, H, W, 3]`` or lazily read), ``fingerprint``; ``scenes`` and ``hard_negatives`` are None."""

    name: str
    fingerprint: str
    captions: list[list[str]]
    splits: dict[str, np.ndarray]
    images: Any
    scenes: Optional[list[dict]] = None
    hard_negatives: Optional[list[list[str]]] = None


def load_images_and_captions(cfg: Config) -> Any:
    """ShapesWorld (``data.name: shapesworld``) or the :class:`CaptionSet` of any image–caption data section."""
    if cfg.data.name == "shapesworld":
        return load_shapesworld(n_scenes=cfg.data.n_scenes, image_size=cfg.data.image_size, seed=cfg.data.seed,
                                cache_dir=cfg.cache_root() / "datasets")
    from experiments.views import caption_source, load_data

    section = cfg.data.views_section()
    src = caption_source(section, load_data(section, cfg.cache_root()))
    if src.images is None:
        raise ValueError(f"data.name={cfg.data.name!r} has no images (precomputed vectors only); the bridge encodes "
                         "images with vision.encoder")
    splits = {k: np.asarray(src.splits.get(k, np.zeros(0, np.int64)), dtype=np.int64) for k in ("train", "val", "test")}
    for k, rows in splits.items():
        if not len(rows):
            raise ValueError(f"data ({cfg.data.name}): the {k} split has no image; the bridge trains on train, "
                             "validates on val and evaluates on test")
    return CaptionSet(name=src.name, fingerprint=src.fingerprint, captions=[list(c) for c in src.captions],
                      splits=splits, images=src.images)


@dataclass(frozen=True)
class BridgeData:
    data: Any  # ShapesWorld or CaptionSet (scenes None: no scene metadata)
    tokens: np.ndarray  # [N, M, d_v] float32: pooled grid tokens of every image
    cells: np.ndarray  # [N, 16, d_v] the encoder's grid (memory-mapped; the seeding aligner may fit on cells)
    llm: Any
    tokenizer: Any
    llm_name: str
    vision: dict[str, Any]  # encoder name, options, image size, tokens: what load_bridge rebuilds
    train_set: Any
    val: dict[str, Any]
    eval_set: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)


def feature_cache(cfg: Config) -> FeatureCache:
    return FeatureCache(cfg.cache_root() / "features")


def use_bf16_linears(setting: bool | str) -> bool:
    """``llm.linears_bf16`` resolved: ``"auto"`` is the retrieval evaluator's rule for the device the bridge trains
    on (:func:`experiments.retrieval.precision.choose_precision`: CUDA with bf16 support, or a CPU where a bf16
    GEMM beats float32)."""
    if setting != "auto":
        return bool(setting)
    from experiments.retrieval.precision import choose_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the Trainer's device "auto"
    return choose_precision("auto", device) == "bf16"


def prepare(cfg: Config) -> BridgeData:
    """Load the images and captions, the frozen features (cached) and the LM; build the training, validation and
    eval sets (without scene metadata: no hard negatives, ``scenes`` None)."""
    t0 = time.perf_counter()
    data = load_images_and_captions(cfg)
    encoder = vision_encoder(cfg.vision.encoder, cfg.vision.options, cfg.data.image_size)
    cells = extract_features(data.images, encoder, cache=feature_cache(cfg), dataset_fingerprint=data.fingerprint,
                             split="all", kinds=("pooled", "grid"))["grid"]
    tokens = pool_grid(cells, cfg.vision.tokens)
    train_idx, val_idx, test_idx = (data.splits[s] for s in ("train", "val", "test"))
    if len(test_idx) < cfg.eval.n_eval_images:
        raise ValueError(f"eval.n_eval_images={cfg.eval.n_eval_images} but the test split has {len(test_idx)} images; "
                         "raise data.n_scenes or lower eval.n_eval_images")
    if cfg.llm.name_or_path == "tiny":
        texts = [c for caps in data.captions for c in caps]
        texts += [c for caps in data.hard_negatives or [] for c in caps]
        texts += [p for ps in PHRASINGS.values() for p in ps] + ["yes no question answer 0 1 2 3 4"]
        words = caption_vocabulary(texts + [cfg.llm.prompt])
        llm, tokenizer = tiny_llm(words, seed=cfg.seeds[0])
        llm_name = "tiny"
    else:
        llm, tokenizer = load_llm(cfg.llm.name_or_path)
        llm_name, words = str(cfg.llm.name_or_path), None
    bf16 = use_bf16_linears(cfg.llm.linears_bf16)
    if bf16:
        low_precision_linears(llm)
    train_caps, train_t2i = data.flat_captions("train")
    train_set = ImageCaptionDataset(tokens[train_idx], train_caps, train_t2i, tokenizer, cfg.llm.max_caption_tokens,
                                    leading_space=caption_leading_space(cfg.llm.prompt))
    n_val = min(cfg.eval.n_val_captions, len(val_idx))
    val = {"image": torch.from_numpy(tokens[val_idx[:n_val]]), "text": [data.captions[i][0] for i in val_idx[:n_val]]}
    ev_idx = test_idx[: cfg.eval.n_eval_images]
    slots = min(cfg.eval.captions_per_image, min(len(data.captions[i]) for i in ev_idx))
    rows = [(r, data.captions[i][j]) for j in range(slots) for r, i in enumerate(ev_idx)]  # neighbours differ
    if data.hard_negatives is not None:
        negs, neg_t2i, neg_kinds = data.flat_hard_negatives(ev_idx)
        sources = [s for i in ev_idx for s in data.hard_negative_sources[i]]
    else:  # a caption set: no hard negatives
        negs, neg_t2i, neg_kinds, sources = [], np.zeros(0, np.int64), [], []
    eval_set = {"image": torch.from_numpy(tokens[ev_idx]), "caption_rows": np.array([r for r, _ in rows]),
                "captions": [c for _, c in rows], "negatives": negs, "negative_rows": neg_t2i,
                "negative_kinds": neg_kinds, "sources": sources,
                "scenes": None if data.scenes is None else [data.scenes[i] for i in ev_idx],
                "truth": [data.captions[i][0] for i in ev_idx], "indices": ev_idx}
    if words is not None:  # a tiny random LM is rebuilt from its vocabulary and seed (experiments.ask)
        llm_name = f"tiny:{cfg.seeds[0]}:" + " ".join(words)
    vision = {"encoder": cfg.vision.encoder, "encoder_name": encoder.name, "options": dict(cfg.vision.options),
              "image_size": cfg.data.image_size, "tokens": cfg.vision.tokens}
    setup = {"llm": llm_name.split(":")[0] if words is not None else llm_name, "vision_encoder": encoder.name, "grid_shape": list(cells.shape),
             "image_tokens": list(tokens.shape[1:]), "prepare_data_seconds": round(time.perf_counter() - t0, 2),
             "linears_bf16": bf16}
    return BridgeData(data=data, tokens=tokens, cells=cells, llm=llm, tokenizer=tokenizer, llm_name=llm_name,
                      vision=vision, train_set=train_set, val=val, eval_set=eval_set, setup=setup)
