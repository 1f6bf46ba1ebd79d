"""Fashion-MNIST (Xiao et al. 2017): 70,000 greyscale 28x28 product photos in 10 named classes.

:func:`read_idx` parses the (gzipped) IDX files of the archive. :func:`load_fashion_mnist` returns
:class:`FashionMNISTData` set up for zero-shot learning: the ``unseen`` classes (default Pullover and Ankle boot,
chosen before any run as one garment and one shoe, each with close seen relatives: Coat/Shirt and Sneaker/Sandal)
never appear in train/val; ``test`` holds the official test rows of the seen classes and ``zeroshot`` those of the
unseen ones (their union is the whole official test set, for generalised zero-shot).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.data._common import CaptionedSplits
from experiments.data.real._split import stratified_take

log = logging.getLogger(__name__)

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
UNSEEN = ("Pullover", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as an array of its stated type and shape. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} not found")
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip: bad magic, truncated stream, bad CRC
        raise ValueError(f"cannot read {path} (damaged or truncated?): {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(eq=False)
class FashionMNISTData(CaptionedSplits):
    """``images`` uint8 [N, 28, 28] (ink bright, as in the archive), ``labels`` int64 [N], ``class_names`` [10],
    ``captions`` [N] one-item lists ("a photo of a trouser"), ``splits`` train/val/test/zeroshot (rows 0-59999 are
    the official train file, 60000-69999 its test file), ``unseen`` class indices."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    captions: list[list[str]]
    splits: dict[str, np.ndarray]
    unseen: tuple[int, ...]
    fingerprint: str
    name: str = "fashion_mnist"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def seen(self) -> tuple[int, ...]:
        return tuple(c for c in range(len(self.class_names)) if c not in self.unseen)

    def images_rgb(self, rows: np.ndarray | None = None, size: int = 32) -> np.ndarray:
        """uint8 [n, size, size, 3]: the photos of ``rows`` (all when None) upscaled bilinearly, grey repeated."""
        from PIL import Image

        idx = np.arange(len(self)) if rows is None else np.asarray(rows)
        out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = np.asarray(Image.fromarray(self.images[i]).resize((size, size), Image.BILINEAR))[..., None]
        return out

    def subset(self, split: str | np.ndarray) -> "FashionMNISTData":
        """The rows of one split (or index array), whose only split, named alike, is all rows."""
        idx = self.indices(split)
        name = split if isinstance(split, str) else "subset"
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx],
                                   captions=[self.captions[i] for i in idx],
                                   splits={name: np.arange(len(idx), dtype=np.int64)},
                                   fingerprint=f"{self.fingerprint}-{name}")


def caption(name: str) -> str:
    """The class text used for DeViSE and captions: "a photo of a t-shirt or top"."""
    text = name.lower().replace("/", " or ")
    return f"a photo of {'an' if text[0] in 'aeiou' else 'a'} {text}"


def load_fashion_mnist(
    path: str | Path | None = None,
    unseen: Sequence[str] = UNSEEN,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    fetch: bool = True,
) -> FashionMNISTData:
    """Load the archive (``path``: a folder with the four ``*-ubyte[.gz]`` files; default: the fetched copy).

    ``train_per_class`` / ``test_per_class`` keep a seeded subset of each class (for quick runs on few cores);
    ``val_fraction`` of the kept seen-class training rows go to ``val``.
    """
    from experiments.data.fetch import find_data

    bad = [u for u in unseen if u not in CLASS_NAMES]
    if bad:
        raise ValueError(f"unknown Fashion-MNIST class(es) {bad}; classes: {', '.join(CLASS_NAMES)}")
    if len(set(unseen)) >= len(CLASS_NAMES) - 1:
        raise ValueError("at least two seen classes are needed")
    root = find_data("fashion_mnist", path, fetch_missing=fetch)
    images, labels, h = [], [], hashlib.sha256()
    for part, (img_name, lab_name) in FILES.items():
        files = []
        for stem in (img_name, lab_name):
            cands = [root / f"{stem}.gz", root / stem]
            f = next((c for c in cands if c.is_file()), None)
            if f is None:
                raise FileNotFoundError(f"Fashion-MNIST {part}: neither {cands[0]} nor {cands[1]} exists")
            files.append(f)
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        x, y = read_idx(files[0]), read_idx(files[1])
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{files[0]} / {files[1]}: expected images [N, 28, 28] and labels [N], "
                             f"got {x.shape} and {y.shape}")
        if y.max() >= len(CLASS_NAMES):
            raise ValueError(f"{files[1]}: label {int(y.max())} is not a class index 0..9")
        images.append(x)
        labels.append(y.astype(np.int64))
    n_train = len(labels[0])
    x, y = np.concatenate(images), np.concatenate(labels)
    unseen_idx = tuple(sorted(CLASS_NAMES.index(u) for u in unseen))
    rng = np.random.default_rng(seed)

    def keep(rows: np.ndarray, per_class: int | None) -> np.ndarray:
        if per_class is None:
            return rows
        return np.sort(np.concatenate([rng.permutation(rows[y[rows] == c])[:per_class] for c in np.unique(y[rows])]))

    train_rows = keep(np.arange(n_train), train_per_class)
    test_rows = keep(np.arange(n_train, len(y)), test_per_class)
    held = np.isin(y, unseen_idx)
    train, val = stratified_take(y, train_rows[~held[train_rows]], val_fraction, seed)
    splits = {"train": train, "val": val, "test": test_rows[~held[test_rows]],
              "zeroshot": test_rows[held[test_rows]]}
    h.update(f"{unseen_idx}|{train_per_class}|{test_per_class}|{val_fraction}|{seed}".encode())
    log.info("fashion_mnist: %d photos, unseen %s, splits %s", len(y), list(unseen),
             {k: len(v) for k, v in splits.items()})
    return FashionMNISTData(images=x, labels=y, class_names=list(CLASS_NAMES),
                            captions=[[caption(CLASS_NAMES[c])] for c in y], splits=splits, unseen=unseen_idx,
                            fingerprint=h.hexdigest()[:16])
