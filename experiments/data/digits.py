"""scikit-learn's handwritten digits (1797 real 8x8 scans shipped inside scikit-learn): images, captions, two views.

* ``images``: float32 [N, 8, 8] in [0, 1] (ink is 1); ``images_rgb``: uint8 [N, S, S, 3], the same scans
  upscaled (bilinear) for CNN encoders;
* ``captions``: N lists of ``captions_per_image`` short texts ("a handwritten digit seven", "the number 7
  written by hand", ...); ``labels["digit"]`` int64 [N] with ``class_names["digit"] = ["zero", ..., "nine"]``;
* ``views``: the classic two-view split of each scan, ``"left"`` (columns 0–3) and ``"right"`` (columns 4–7),
  each float32 [N, 32] (rows flattened), for CCA-style alignment between two halves of one object;
* ``splits``: stratified train/val/test fixed by ``seed``; digits in ``holdout_digits`` go to the split
  ``"zeroshot"`` only (never to train, val or test), as in ShapesWorld.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from experiments.data._common import CaptionedSplits, check_fractions, replace_config
from experiments.data._common import fingerprint as _fingerprint

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a scanned handwritten {word}",
    "a low-resolution picture of the digit {num}",
    "the digit {word}",
    "a handwritten {num}",
    "someone wrote the number {word}",
    "a small grey image of a handwritten {word}",
)
_VERSION = 1


@dataclass(frozen=True)
class DigitsConfig:
    """Everything that determines a DigitsData (and its fingerprint)."""

    image_size: int = 32
    seed: int = 0
    captions_per_image: int = 5
    holdout_digits: tuple[int, ...] = ()
    train_fraction: float = 0.8
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        holdout = tuple(sorted({int(d) for d in self.holdout_digits}))
        bad = [d for d in holdout if not 0 <= d <= 9]
        if bad:
            raise ValueError(f"holdout_digits must be in 0..9, got {bad}")
        if len(holdout) == 10:
            raise ValueError("holdout_digits holds every digit: nothing would be left to train on")
        object.__setattr__(self, "holdout_digits", holdout)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if not 1 <= self.captions_per_image <= len(_TEMPLATES):
            raise ValueError(f"captions_per_image must be in 1..{len(_TEMPLATES)}, got {self.captions_per_image}")
        check_fractions({"train_fraction": self.train_fraction, "val_fraction": self.val_fraction,
                         "test_fraction": self.test_fraction})


@dataclass(eq=False)
class DigitsData(CaptionedSplits):
    """Row-aligned arrays over the N scans; see the module docstring for shapes."""

    config: DigitsConfig
    images: np.ndarray
    images_rgb: np.ndarray
    captions: list[list[str]]
    labels: dict[str, np.ndarray]
    class_names: dict[str, list[str]]
    views: dict[str, np.ndarray]
    splits: dict[str, np.ndarray]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, split: str | np.ndarray) -> "DigitsData":
        """The rows of one split (or index array), whose only split, named alike, is all rows."""
        idx = self.indices(split)
        name = split if isinstance(split, str) else "subset"
        return dataclasses.replace(
            self, images=self.images[idx], images_rgb=self.images_rgb[idx],
            captions=[self.captions[i] for i in idx], labels={k: v[idx] for k, v in self.labels.items()},
            views={k: v[idx] for k, v in self.views.items()}, splits={name: np.arange(len(idx), dtype=np.int64)},
            fingerprint=f"{self.fingerprint}-{name}",
        )


def load_digits(config: DigitsConfig | None = None, **overrides: Any) -> DigitsData:
    """Load the digits with captions, views and splits (fast: no cache needed). Bad options raise ValueError."""
    from PIL import Image
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    config = replace_config(config or DigitsConfig(), overrides, "digits")

    raw = sk_load_digits()
    images = (raw.images / 16.0).astype(np.float32)  # [N, 8, 8], 0..16 ink counts -> [0, 1]
    digits = raw.target.astype(np.int64)
    n = len(digits)
    grey = np.rint(images * 255).astype(np.uint8)
    s = config.image_size
    rgb = np.stack([np.asarray(Image.fromarray(g).resize((s, s), Image.BILINEAR)) for g in grey])
    rgb = np.repeat(rgb[..., None], 3, axis=-1)

    rng = np.random.default_rng([config.seed, 0])
    captions = []
    for d in digits:
        chosen = rng.choice(len(_TEMPLATES), size=config.captions_per_image, replace=False)
        captions.append([_TEMPLATES[t].format(word=DIGIT_NAMES[d], num=int(d)) for t in sorted(chosen)])

    held = np.isin(digits, config.holdout_digits)
    pool = np.flatnonzero(~held)
    splits: dict[str, np.ndarray] = {}
    rest_frac = config.val_fraction + config.test_fraction
    if rest_frac > 0 and config.train_fraction > 0:
        train, rest = train_test_split(pool, test_size=rest_frac, stratify=digits[pool], random_state=config.seed)
    else:
        train, rest = (pool, pool[:0]) if rest_frac == 0 else (pool[:0], pool)
    if config.val_fraction > 0 and config.test_fraction > 0:
        val, test = train_test_split(rest, test_size=config.test_fraction / rest_frac, stratify=digits[rest],
                                     random_state=config.seed)
    else:
        val, test = (rest, rest[:0]) if config.test_fraction == 0 else (rest[:0], rest)
    for name, idx in (("train", train), ("val", val), ("test", test), ("zeroshot", np.flatnonzero(held))):
        splits[name] = np.sort(np.asarray(idx, dtype=np.int64))

    flat = images.reshape(n, 8, 8)
    views = {"left": flat[:, :, :4].reshape(n, 32).copy(), "right": flat[:, :, 4:].reshape(n, 32).copy()}
    cfg = dataclasses.asdict(config)
    cfg["holdout_digits"] = list(config.holdout_digits)
    log.info("digits: %d scans, splits %s", n, {k: len(v) for k, v in splits.items()})
    return DigitsData(
        config=config, images=images, images_rgb=rgb, captions=captions,
        labels={"digit": digits}, class_names={"digit": list(DIGIT_NAMES)}, views=views, splits=splits,
        fingerprint=_fingerprint("digits", _VERSION, cfg),
    )
