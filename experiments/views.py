"""The data → features layer: any data section becomes the inputs parts declare, through frozen encoders and the cache.

* :func:`check_data_section` validates a ``data`` section (name in ``experiments.data.DATASETS``, the loader's
  options and paths) before any work; :func:`load_data` loads it (ShapesWorld cached under ``cache_root``).
* :class:`PairViews` turns an image–caption source (ShapesWorld, digits, a CSV or Karpathy caption set, any
  registered loader returning ``ImageTextData``, or precomputed ``embeddings``) into the input *kinds* aligners
  declare: ``vector`` (encoder ``pooled``), ``grid`` (encoder ``grid``), ``pixels`` (uint8 images), ``raw``
  (caption strings), ``graph`` (caption graphs), ``class`` (labels, with text embeddings of the class names).
  ``digits`` with ``view: halves`` pairs the left and right half of each scan (``vector`` only).
* Multi-view classification data (``MultiViewData``) is turned into fusion tasks by :mod:`experiments.tasks`.

Encoders are named in the run config (``encoders: {image: mobilenet_v2, text: minilm}``), never here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from pydantic import Field

from experiments.config import ConfigError, DataSection, Section, check_kwargs

log = logging.getLogger(__name__)

# options of a data section that configure the views, not the loader
VIEW_OPTIONS = ("view", "max_eval_images", "image_size", "split_seed", "caption_noise", "cnn_pixels", "flat_pixels")
_PATH_KEYS = ("path", "image_root", "split_path", "image_npy", "text_npy", "text_to_image_npy")


class EncodersSection(Section):
    """Frozen encoders (``experiments.features.ENCODERS`` names) and their constructor options."""

    image: str = "mobilenet_v2"
    text: str = "minilm"
    image_options: dict[str, Any] = Field(default_factory=dict)
    text_options: dict[str, Any] = Field(default_factory=dict)


def check_encoders(enc: EncodersSection, where: str) -> None:
    from experiments.features import ENCODERS

    for modality in ("image", "text"):
        name = getattr(enc, modality)
        if name not in ENCODERS:
            raise ConfigError(f"{where}: encoders.{modality}: unknown encoder {name!r}; known: "
                              f"{', '.join(ENCODERS.names())}")
        check_kwargs(ENCODERS.get(name), getattr(enc, f"{modality}_options"), f"{where}: encoders.{modality}_options")


def _loader_options(section: DataSection) -> dict[str, Any]:
    """The section's options that go to its loader (view options the loader does not take are left out)."""
    opts = section.options()
    accepted = _signature(section.name)
    opts = {k: v for k, v in opts.items() if k not in VIEW_OPTIONS or k in accepted}
    if section.name == "shapesworld" and "holdout" in opts:
        opts["holdout"] = tuple(tuple(h) for h in opts["holdout"])
    if section.name == "digits" and "holdout" in opts:
        opts["holdout_digits"] = tuple(int(h) for h in opts.pop("holdout"))
    return opts


def _signature(name: str) -> set[str]:
    import inspect

    from experiments.data import DATASETS

    params = inspect.signature(DATASETS[name]).parameters
    names = set(params)
    config = _config_class(name)
    if config is not None:
        import dataclasses

        names |= {f.name for f in dataclasses.fields(config)}
    return names


def _config_class(name: str):
    from experiments.data import DigitsConfig, ShapesWorldConfig

    return {"shapesworld": ShapesWorldConfig, "digits": DigitsConfig}.get(name)


def check_data_section(section: DataSection, where: str) -> None:
    """Name, option names, option values (through the dataset's config class) and input paths, before any work."""
    from experiments.data import DATASETS
    from experiments.data._common import replace_config

    if section.name not in DATASETS:
        raise ConfigError(f"{where}: data.name: unknown dataset {section.name!r}; known: {', '.join(sorted(DATASETS))}")
    view = section.options().get("view", "image_text")
    if view not in ("image_text", "halves") or (view == "halves" and section.name != "digits"):
        raise ConfigError(f"{where}: data.view must be 'image_text' (or 'halves' for digits), got {view!r}")
    opts = _loader_options(section)
    config = _config_class(section.name)
    if config is not None:
        try:
            replace_config(config(), opts, f"{where}: data ({section.name})")
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: data: {e}") from None
    else:
        check_kwargs(DATASETS[section.name], opts, f"{where}: data ({section.name})", skip=("check_files",))
    for k in _PATH_KEYS:
        if opts.get(k) is not None and not Path(opts[k]).exists():
            raise ConfigError(f"{where}: data.{k}: {opts[k]} does not exist")


def load_data(section: DataSection, cache_root: Path) -> Any:
    """The dataset object of ``section`` (``ShapesWorld``, ``DigitsData``, ``ImageTextData``, ``MultiViewData``...)."""
    from experiments.data import load_dataset

    opts = _loader_options(section)
    if section.name == "shapesworld":
        opts = {"cache_dir": cache_root / "datasets", **opts}
    if section.name == "karpathy":  # splits from the file: one load per split
        return _karpathy_splits(opts)
    return load_dataset(section.name, **opts)


# ------------------------------------------------------------------------------------------ image-caption sources


class LazyImages:
    """Images of an ``ImageTextData`` read on demand at ``size`` px: ``x[a:b]`` is uint8 [B, size, size, 3]."""

    def __init__(self, data: Any, rows: np.ndarray, size: int) -> None:
        self.data, self.rows, self.size = data, np.asarray(rows), size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = self.rows[index]
        if np.ndim(rows) == 0:
            return self.data.load_image(int(rows), self.size)
        return np.stack([self.data.load_image(int(i), self.size) for i in rows])


@dataclass
class CaptionSource:
    """What :class:`PairViews` needs of any image–caption data: per-image captions, splits, images (or fixed
    vectors), and optionally labels, class prompts and hard negatives."""

    name: str
    fingerprint: str
    captions: list[list[str]]
    splits: dict[str, np.ndarray]
    images: Any = None  # uint8 [N, H, W, 3] or LazyImages; None for vector-only sources
    vectors: Optional[dict[str, Any]] = None  # {"image": [N, d], "text": [N_text, d]} for vector-only sources
    labels: Optional[np.ndarray] = None
    class_names: Optional[list[str]] = None
    class_prompt: str = "a {}"
    label_key: str = "class"
    hard_negatives: Optional[Callable[[np.ndarray], tuple[list[str], list[str], np.ndarray]]] = None
    describe: dict[str, str] = field(default_factory=dict)
    dataset: Any = None


def _split_rows(n: int, seed: int) -> dict[str, np.ndarray]:
    from experiments.data._common import seeded_splits

    s = seeded_splits(n, {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    return {k: s[k] for k in ("train", "val", "test")}


def _karpathy_splits(opts: dict[str, Any]) -> Any:
    from experiments.data import load_karpathy

    parts = {}
    for split in ("train", "val", "test"):
        try:
            parts[split] = load_karpathy(split=split, **opts)
        except ValueError as e:
            if "no image in split" in str(e) and split == "val":
                continue
            raise
    return parts


def caption_source(section: DataSection, data: Any) -> CaptionSource:
    """Adapt any loaded image–caption dataset to a :class:`CaptionSource`."""
    from experiments.data import DigitsData, EmbeddingPairs, ImageTextData, ShapesWorld

    opts = section.options()
    view = opts.get("view", "image_text")
    if isinstance(data, ShapesWorld):
        def hard(idx: np.ndarray):
            src = [s for i in idx for s in data.hard_negative_sources[i]]
            neg = [s for i in idx for s in data.hard_negatives[i]]
            owner = np.repeat(np.arange(len(idx)), [len(data.hard_negatives[i]) for i in idx])
            return src, neg, owner

        return CaptionSource("shapesworld", data.fingerprint, data.captions, dict(data.splits), images=data.images,
                             labels=np.asarray(data.labels["shape_colour"]),
                             class_names=list(data.class_names["shape_colour"]), label_key="shape_colour",
                             hard_negatives=hard, dataset=data)
    if isinstance(data, DigitsData):
        labels, names = np.asarray(data.labels["digit"]), list(data.class_names["digit"])
        if view == "halves":
            caps = [[f"right half {i}"] for i in range(len(labels))]
            return CaptionSource("digits", data.fingerprint, caps, dict(data.splits),
                                 vectors={"image": np.asarray(data.views["left"], np.float32),
                                          "text": np.asarray(data.views["right"], np.float32)},
                                 labels=labels, class_names=names, label_key="digit",
                                 describe={"image": "left half of the digit (32 raw pixels)",
                                           "text": "right half (32 raw pixels)"}, dataset=data)
        return CaptionSource("digits", data.fingerprint, data.captions, dict(data.splits), images=data.images_rgb,
                             labels=labels, class_names=names, class_prompt="the digit {}", label_key="digit",
                             dataset=data)
    if view != "image_text":
        raise ConfigError(f"data.view={view!r} is only for digits (halves); {section.name} has image_text only")
    size = int(opts.get("image_size", 224))
    if isinstance(data, EmbeddingPairs):
        t2i = data.text_to_image
        caps = [[] for _ in range(len(data.image_emb))]
        for j, i in enumerate(t2i):
            caps[int(i)].append(f"text {j}")
        return CaptionSource("embeddings", data.fingerprint, caps, _split_rows(len(caps), opts.get("split_seed", 0)),
                             vectors={"image": data.image_emb, "text": data.text_emb},
                             describe={"image": f"precomputed image embeddings [{data.image_emb.shape[1]}]",
                                       "text": f"precomputed text embeddings [{data.text_emb.shape[1]}]"},
                             dataset=data)
    if isinstance(data, dict):  # Karpathy: one ImageTextData per split of the file
        parts = list(data.values())
        offsets = np.cumsum([0] + [len(p) for p in parts])
        caps = [p.captions_of(i) for p in parts for i in range(len(p))]
        splits = {s: np.arange(offsets[k], offsets[k + 1]) for k, s in enumerate(data)}
        splits.setdefault("val", splits["train"][:0])

        class _Concat:
            def load_image(self, i: int, size: int) -> np.ndarray:
                k = int(np.searchsorted(offsets, i, side="right") - 1)
                return parts[k].load_image(i - int(offsets[k]), size)

        fp = "-".join(p.fingerprint for p in parts)
        return CaptionSource(section.name, fp[:48], caps, splits, images=LazyImages(_Concat(), np.arange(len(caps)),
                                                                                  size), dataset=data)
    if isinstance(data, ImageTextData):
        caps = [data.captions_of(i) for i in range(len(data))]
        labels = getattr(data, "labels", None)
        return CaptionSource(section.name, data.fingerprint, caps,
                             getattr(data, "splits", None) or _split_rows(len(caps), opts.get("split_seed", 0)),
                             images=LazyImages(data, np.arange(len(data)), size),
                             labels=None if labels is None else np.asarray(labels),
                             class_names=getattr(data, "class_names", None), dataset=data)
    if hasattr(data, "captions") and hasattr(data, "splits") and hasattr(data, "images"):  # e.g. fashion_mnist
        images = data.images_rgb(size=size) if callable(getattr(data, "images_rgb", None)) else data.images
        labels = getattr(data, "labels", None)
        return CaptionSource(section.name, data.fingerprint, data.captions, dict(data.splits), images=images,
                             labels=None if labels is None else np.asarray(labels),
                             class_names=getattr(data, "class_names", None), dataset=data)
    raise ConfigError(f"data {section.name!r} gives a {type(data).__name__}, which has no images and captions; "
                      "the align runner takes shapesworld, digits, csv, karpathy, embeddings or a loader returning "
                      "ImageTextData")


class PairViews:
    """One image–caption source split into train/val/test, offering every input kind it has, lazily and cached.

    ``image(kind, split)`` / ``split_text(kind, split)`` give arrays (graph tensors, string lists) for the image rows
    and caption rows of a split; ``dims(inputs)`` the feature size of each declared input.
    """

    def __init__(self, source: CaptionSource, encoders: EncodersSection, cache: Any, batch_size: int = 64,
                 max_eval_images: int | None = None) -> None:
        self.src, self.encoders, self.cache = source, encoders, cache
        self.batch_size, self.max_eval_images = batch_size, max_eval_images
        self._memo: dict[tuple, Any] = {}

    @property
    def name(self) -> str:
        return self.src.name

    @property
    def kinds(self) -> dict[str, set[str]]:
        """Input kinds available per batch key."""
        if self.src.vectors is not None:
            return {"image": {"vector"}, "text": {"vector"}}
        kinds = {"image": {"vector", "grid", "pixels"}, "text": {"vector", "graph", "raw"}}
        if self.src.labels is not None:
            kinds["label"] = {"class"}
        return kinds

    def missing(self, inputs: dict[str, str]) -> list[str]:
        """``key:kind`` entries of ``inputs`` this data cannot give."""
        return [f"{k}:{v}" for k, v in inputs.items() if v not in self.kinds.get(k, set())]

    def describe(self) -> dict[str, str]:
        if self.src.describe:
            return dict(self.src.describe)
        return {"image": f"{self._encoder('image').name} pooled / grid",
                "text": f"{self._encoder('text').name} sentence embedding"}

    def split_index(self, split: str) -> np.ndarray:
        idx = np.asarray(self.src.splits[split])
        if split == "test" and self.max_eval_images is not None:
            idx = idx[: self.max_eval_images]
        return idx

    def captions(self, split: str) -> tuple[list[str], np.ndarray]:
        """Caption strings of the split's images and their image rows (0..n_split-1)."""
        idx = self.split_index(split)
        texts = [t for i in idx for t in self.src.captions[i]]
        t2i = np.repeat(np.arange(len(idx)), [len(self.src.captions[i]) for i in idx])
        return texts, t2i

    def _memoised(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _encoder(self, modality: str) -> Any:
        from experiments.features import build_encoder

        name = getattr(self.encoders, modality)
        opts = getattr(self.encoders, f"{modality}_options")
        return self._memoised(("encoder", modality), lambda: build_encoder(name, **opts))

    def image_features(self) -> dict[str, np.ndarray]:
        """Encoder outputs (``pooled``, ``grid``) for every image of the source, from the cache when present."""
        from experiments.features import extract_features

        enc = self._encoder("image")
        kinds = tuple(k for k in ("pooled", "grid") if k in enc.kinds)
        return self._memoised(("image-features",), lambda: extract_features(
            self.src.images, enc, self.cache, self.src.fingerprint, "all", batch_size=self.batch_size, kinds=kinds))

    def encode_texts(self, texts: list[str], key: str) -> np.ndarray:
        """Text-encoder embeddings [N, d] of ``texts``, cached under the source fingerprint and ``key``."""
        from experiments.features import extract_features

        enc = self._encoder("text")
        return self._memoised(("text", key), lambda: extract_features(
            texts, enc, self.cache, self.src.fingerprint, key, batch_size=4 * self.batch_size)["pooled"])

    def graphs(self, texts: list[str], key: str) -> Any:
        from align.graphs import TextGraphBuilder, build_caption_graphs

        builder = self._memoised(("graph-builder",), TextGraphBuilder)
        # cached beside the features; the file's key covers the texts, the parser and the word embedder
        path = None if self.cache is None else (
            self.cache.entry_dir("caption-graphs", self.src.fingerprint, key) / "graphs.safetensors")
        return self._memoised(("graphs", key), lambda: build_caption_graphs(texts, builder, progress=True,
                                                                            cache_path=path))

    def image(self, kind: str, split: str) -> Any:
        idx = self.split_index(split)
        if self.src.vectors is not None:
            return np.asarray(self.src.vectors["image"][idx], dtype=np.float32)
        if kind == "pixels":
            return np.asarray(self.src.images[idx])
        return self.image_features()["pooled" if kind == "vector" else "grid"][idx]

    def text(self, kind: str, texts: list[str], key: str) -> Any:
        """Inputs of ``kind`` for caption strings ``texts`` (``key`` names them in the cache)."""
        if kind == "raw":
            return list(texts)
        if kind == "graph":
            return self.graphs(texts, key)
        return self.encode_texts(texts, key)

    def split_text(self, kind: str, split: str) -> tuple[Any, np.ndarray]:
        if self.src.vectors is not None:
            idx = self.split_index(split)
            if self.src.name == "embeddings":
                t2i_all = self.src.dataset.text_to_image
                rows = np.flatnonzero(np.isin(t2i_all, idx))
                local = np.searchsorted(idx, t2i_all[rows]) if np.all(np.diff(idx) > 0) else \
                    np.array([int(np.flatnonzero(idx == i)[0]) for i in t2i_all[rows]])
                return np.asarray(self.src.vectors["text"][rows], dtype=np.float32), local
            return np.asarray(self.src.vectors["text"][idx], dtype=np.float32), np.arange(len(idx))
        texts, t2i = self.captions(split)
        return self.text(kind, texts, f"captions-{split}-{len(texts)}"), t2i

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.src.labels)[self.split_index(split)]

    def class_embeddings(self) -> torch.Tensor:
        prompts = [self.src.class_prompt.format(n) for n in self.src.class_names]
        emb = self.encode_texts(prompts, f"classes-{self.src.label_key}")
        return torch.from_numpy(np.asarray(emb, dtype=np.float32))

    def dims(self, inputs: dict[str, str]) -> dict[str, int]:
        """Feature dimension of each declared input (0 where not a feature array)."""
        dims = {}
        for key, kind in inputs.items():
            if kind in ("vector", "grid"):
                probe = self.image(kind, "train") if key == "image" else self.split_text(kind, "train")[0]
                dims[key] = int(probe.shape[-1])
            elif kind == "graph":
                dims[key] = int(self.split_text("graph", "val")[0].x.shape[-1])
            else:
                dims[key] = 0
        return dims

    def hard_negatives(self, split: str) -> tuple[list[str], list[str], np.ndarray] | None:
        """(true captions, minimally edited false captions, image row of each) where the data has them."""
        return None if self.src.hard_negatives is None else self.src.hard_negatives(self.split_index(split))

    def zero_shot_rows(self) -> np.ndarray:
        """Test rows plus the held-out-label rows (``zeroshot`` split), for zero-shot label prediction."""
        return np.concatenate([self.split_index("test"), np.asarray(self.src.splits.get("zeroshot", []), np.int64)])

    def chance(self) -> dict[str, float]:
        """Expected R@1 (%) of a random ranking, both directions, on the test split."""
        _, t2i = self.captions("test") if self.src.vectors is None else self.split_text("vector", "test")
        n_img, n_txt = int(t2i.max()) + 1, len(t2i)
        return {"image_to_text_R@1": 100.0 * min(1.0, (n_txt / n_img) / n_txt), "text_to_image_R@1": 100.0 / n_img}


def pair_views(section: DataSection, encoders: EncodersSection, cache_root: Path, batch_size: int = 64) -> PairViews:
    """Load ``section`` and wrap it as :class:`PairViews` (features cached under ``cache_root/features``)."""
    from experiments.features import FeatureCache

    source = caption_source(section, load_data(section, cache_root))
    opts = section.options()
    return PairViews(source, encoders, FeatureCache(cache_root / "features"), batch_size,
                     opts.get("max_eval_images"))
