"""The ShapesWorld data set: its config (everything that determines it) and the generated data with its on-disk form.

:class:`ShapesWorld` holds row-aligned arrays and text and writes/reads a directory (``.npy`` arrays, JSON text, a
manifest checked on load); :func:`shapesworld_fingerprint` is the cache key. Generation is in :mod:`.generate`,
loading through the cache in :func:`experiments.data.shapesworld.load_shapesworld`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from align.weights import write_dir_atomically
from experiments.data._common import (
    CaptionedSplits,
    check_fractions,
    check_manifest,
    fingerprint as _fingerprint,
    load_json,
    save_json,
    write_manifest,
)
from experiments.data.shapesworld.scenes import MAX_OBJECTS
from experiments.data.shapesworld.vocab import COLOURS, SHAPES

GENERATOR_VERSION = 1  # bump when the output for a given config changes (invalidates caches)
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Everything that determines a ShapesWorld (and its cache fingerprint).

    ``holdout`` lists (colour, shape) combinations (or ``"red circle"`` strings) whose scenes go to the
    ``"zeroshot"`` split only. The remaining scenes are split ``train_fraction/val_fraction/test_fraction``.
    """

    n_scenes: int = 10000
    image_size: int = 128
    seed: int = 0
    max_objects: int = 4
    captions_per_image: int = 5
    negatives_per_image: int = 3
    caption_noise: float = 0.25
    holdout: tuple[tuple[str, str], ...] = ()
    train_fraction: float = 0.8
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "holdout", _normalise_holdout(self.holdout))
        for name in ("n_scenes", "image_size", "seed", "max_objects", "captions_per_image", "negatives_per_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.n_scenes <= 0:
            raise ValueError(f"n_scenes must be positive, got {self.n_scenes}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if not 1 <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {self.max_objects}")
        if not 1 <= self.captions_per_image <= 20:
            raise ValueError(f"captions_per_image must be in 1..20, got {self.captions_per_image}")
        if not 0 <= self.negatives_per_image <= 10:
            raise ValueError(f"negatives_per_image must be in 0..10, got {self.negatives_per_image}")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {self.caption_noise}")
        check_fractions({"train_fraction": self.train_fraction, "val_fraction": self.val_fraction,
                         "test_fraction": self.test_fraction})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["holdout"] = [list(p) for p in self.holdout]
        return d


def _normalise_holdout(holdout: Iterable[Any] | None) -> tuple[tuple[str, str], ...]:
    if holdout is None:
        return ()
    if isinstance(holdout, str) or (isinstance(holdout, (tuple, list)) and len(holdout) == 2
                                    and all(isinstance(h, str) and " " not in h.strip() for h in holdout)):
        holdout = [holdout]  # a single combination given on its own: "red circle" or ("red", "circle")
    pairs = []
    for item in holdout:
        pair = tuple(item.split()) if isinstance(item, str) else tuple(item)
        if len(pair) != 2:
            raise ValueError(f"holdout entries must be (colour, shape) pairs, got {item!r}")
        colour, shape = pair
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r} in holdout {item!r}; known colours: {', '.join(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} in holdout {item!r}; known shapes: {', '.join(SHAPES)}")
        if pair not in pairs:
            pairs.append(pair)
    return tuple(sorted(pairs))


@dataclass(eq=False)
class ShapesWorld(CaptionedSplits):
    """A generated ShapesWorld. Arrays are row-aligned with ``scenes`` (N rows).

    images: uint8 [N, H, W, 3]; depth: uint8 [N, H, W] (0 near .. 255 far/background);
    captions: N lists of ``captions_per_image`` true captions; caption_facts: their structured facts;
    hard_negatives / hard_negative_kinds / hard_negative_sources / hard_negative_facts: N lists of false captions,
    the kind of each (see ``HARD_NEGATIVE_KINDS``), the true caption each was perturbed from, and its facts;
    scenes: N JSON-serialisable dicts (objects, relations, nearest, largest, background; see the module doc);
    labels: task -> int64 [N] indexing ``class_names[task]``;
    noisy_captions: N strings naming the largest object's shape, wrong where ``noisy_corrupted`` [N] is true;
    splits: split name -> sorted int64 indices ("train", "val", "test", "zeroshot").
    """

    config: ShapesWorldConfig
    images: np.ndarray
    depth: np.ndarray
    captions: list[list[str]]
    caption_facts: list[list[list[dict]]]
    hard_negatives: list[list[str]]
    hard_negative_kinds: list[list[str]]
    hard_negative_sources: list[list[str]]
    hard_negative_facts: list[list[list[dict]]]
    scenes: list[dict]
    labels: dict[str, np.ndarray]
    class_names: dict[str, list[str]]
    noisy_captions: list[str]
    noisy_corrupted: np.ndarray
    splits: dict[str, np.ndarray]
    fingerprint: str
    cache_path: Path | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.scenes)

    def flat_hard_negatives(self, split: str | np.ndarray | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """Hard negatives of ``split`` flattened in image order, their ``text_to_image`` (split rows) and kinds."""
        idx = self.indices(split)
        texts = [t for i in idx for t in self.hard_negatives[i]]
        kinds = [k for i in idx for k in self.hard_negative_kinds[i]]
        t2i = np.repeat(np.arange(len(idx), dtype=np.int64), [len(self.hard_negatives[i]) for i in idx])
        return texts, t2i, kinds

    def subset(self, split: str | np.ndarray) -> "ShapesWorld":
        """The rows of one split (or index array) as a ShapesWorld whose only split, named alike, is all rows."""
        idx = self.indices(split)
        name = split if isinstance(split, str) else "subset"

        def pick(xs: list) -> list:
            return [xs[i] for i in idx]

        return dataclasses.replace(
            self,
            images=np.asarray(self.images[idx]), depth=np.asarray(self.depth[idx]),
            captions=pick(self.captions), caption_facts=pick(self.caption_facts),
            hard_negatives=pick(self.hard_negatives), hard_negative_kinds=pick(self.hard_negative_kinds),
            hard_negative_sources=pick(self.hard_negative_sources), hard_negative_facts=pick(self.hard_negative_facts),
            scenes=pick(self.scenes), labels={k: v[idx] for k, v in self.labels.items()},
            noisy_captions=pick(self.noisy_captions), noisy_corrupted=self.noisy_corrupted[idx],
            splits={name: np.arange(len(idx), dtype=np.int64)},
            fingerprint=f"{self.fingerprint}-{name}" if isinstance(split, str) else f"{self.fingerprint}-subset",
            cache_path=None,
        )

    # ---- persistence

    _TEXT_FIELDS = ("captions", "hard_negatives", "hard_negative_kinds", "hard_negative_sources", "noisy_captions")
    _FACT_FIELDS = ("caption_facts", "hard_negative_facts")

    def save(self, path: str | Path) -> Path:
        """Write the dataset to directory ``path`` atomically (temporary sibling, then rename)."""

        def write(tmp: Path) -> None:
            np.save(tmp / "images.npy", np.ascontiguousarray(self.images))
            np.save(tmp / "depth.npy", np.ascontiguousarray(self.depth))
            np.save(tmp / "noisy_corrupted.npy", self.noisy_corrupted)
            for group in ("labels", "splits"):
                (tmp / group).mkdir()
                for name, arr in getattr(self, group).items():
                    np.save(tmp / group / f"{name}.npy", arr)
            save_json(tmp / "text.json", {k: getattr(self, k) for k in self._TEXT_FIELDS})
            save_json(tmp / "facts.json", {k: getattr(self, k) for k in self._FACT_FIELDS})
            save_json(tmp / "scenes.json", self.scenes)
            save_json(tmp / "meta.json", {"name": "shapesworld", "version": GENERATOR_VERSION,
                                          "fingerprint": self.fingerprint, "config": self.config.to_dict(),
                                          "class_names": self.class_names, "labels": list(self.labels),
                                          "splits": list(self.splits)})
            write_manifest(tmp)  # last: size + sha256 of every file, checked by load

        return write_dir_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "ShapesWorld":
        """Read a dataset written by :meth:`save`; images and depth are memory-mapped (read-only) if ``mmap``.

        Every file is checked against the directory's manifest first (size; sha256 once per process): a damaged,
        truncated or swapped file raises ``ValueError`` naming it.
        """
        path = Path(path)
        problem = check_manifest(path)
        if problem is not None:
            raise ValueError(f"ShapesWorld directory {path}: {problem}")
        meta = load_json(path / "meta.json")
        mode = "r" if mmap else None
        text = load_json(path / "text.json")
        facts = load_json(path / "facts.json")
        return cls(
            config=ShapesWorldConfig(**meta["config"]),
            images=np.load(path / "images.npy", mmap_mode=mode),
            depth=np.load(path / "depth.npy", mmap_mode=mode),
            scenes=load_json(path / "scenes.json"),
            labels={k: np.load(path / "labels" / f"{k}.npy") for k in meta["labels"]},
            class_names=meta["class_names"],
            noisy_corrupted=np.load(path / "noisy_corrupted.npy"),
            splits={k: np.load(path / "splits" / f"{k}.npy") for k in meta["splits"]},
            fingerprint=meta["fingerprint"],
            cache_path=path,
            **{k: text[k] for k in cls._TEXT_FIELDS},
            **{k: facts[k] for k in cls._FACT_FIELDS},
        )


def shapesworld_fingerprint(config: ShapesWorldConfig) -> str:
    """Cache key of a config (and of the generator version)."""
    return _fingerprint("shapesworld", GENERATOR_VERSION, config.to_dict())
