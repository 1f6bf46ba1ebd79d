"""Validation of retrieval inputs, the ground-truth index, and rows read block by block in float64.

Every array may be a numpy array (memory-mapped too) or a tensor on any device. Errors name the
array (the CLI passes the file names) and the first bad row.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # np.ndarray (memory-mapped or not) | torch.Tensor

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: bytes of one block (float32 scores + its boolean mask) when ``chunk_size`` is not given
DEFAULT_MEMORY_BUDGET: int = 256 * 2**20
DIRECTIONS: tuple[str, str] = ("image_to_text", "text_to_image")
SHORT_NAMES: dict[str, str] = {"image_to_text": "i2t", "text_to_image": "t2i"}
TIE_MODES: tuple[str, ...] = ("expected", "pessimistic", "optimistic")
DEGENERATE_MODES: tuple[str, ...] = ("error", "tie")
_DEFAULT_NAMES = ("image_emb", "text_emb", "text_to_image")
_SCAN_ROWS = 8192  # rows per read when scanning a whole array (memmap-friendly, bounded memory)


def _shape(x: ArrayLike) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _first_nonfinite_row(x: ArrayLike, block: int = 65536) -> int | None:
    """Index of the first row of ``x`` [N, ...] holding NaN or Inf, scanning in blocks (memmap-friendly)."""
    for s in range(0, _shape(x)[0], block):
        chunk = x[s : s + block]
        if isinstance(chunk, torch.Tensor):
            bad = ~torch.isfinite(chunk.reshape(len(chunk), -1)).all(1)
            if bool(bad.any()):
                return s + int(bad.nonzero()[0, 0])
        else:
            chunk = np.asarray(chunk)
            if not np.issubdtype(chunk.dtype, np.floating):
                continue
            bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(1)
            if bad.any():
                return s + int(np.argmax(bad))
    return None


def check_finite(x: ArrayLike, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the first row holding NaN or Inf."""
    row = _first_nonfinite_row(x)
    if row is not None:
        raise ValueError(f"{name} has non-finite values (NaN or Inf), first in row {row}")


def _as_index_array(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def validate_ground_truth(
    text_to_image: ArrayLike,
    n_images: int,
    n_texts: int,
    *,
    names: Sequence[str] = _DEFAULT_NAMES,
) -> np.ndarray:
    """``text_to_image`` as int64 [N_text] after checking its length, its range and that every image
    has a caption (``names``: image, text and ground-truth names used in the messages)."""
    n_img, n_txt, n_map = names
    g = _as_index_array(text_to_image, n_map)
    if len(g) != n_texts:
        raise ValueError(f"{n_txt} has {n_texts} rows but {n_map} has {len(g)}")
    bad = np.flatnonzero((g < 0) | (g >= n_images))
    if len(bad):
        j = int(bad[0])
        raise ValueError(f"{n_map}[{j}] = {int(g[j])} is out of range for {n_images} images in {n_img} "
                         f"({len(bad)} bad entries)")
    orphans = np.flatnonzero(np.bincount(g, minlength=n_images) == 0)
    if len(orphans):
        raise ValueError(f"image row {int(orphans[0])} of {n_img} has no caption in {n_map} "
                         f"({len(orphans)} images without captions)")
    return g


def validate_retrieval_inputs(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    *,
    names: Sequence[str] = _DEFAULT_NAMES,
) -> np.ndarray:
    """Check shapes, the ground truth and finiteness; return ``text_to_image`` as int64 [N_text].

    ``image_emb`` [N_img, D], ``text_emb`` [N_text, D], ``text_to_image`` [N_text] with values in
    ``[0, N_img)`` and every image owning at least one caption. ``names`` are used in the messages
    (the CLI passes the file names). Zero-norm rows are checked where the rows are read
    (:class:`Rows`), since that needs their norms.
    """
    n_img, n_txt, n_map = names
    si, st = _shape(image_emb), _shape(text_emb)
    for name, s, what in ((n_img, si, "N_images"), (n_txt, st, "N_texts")):
        if len(s) != 2:
            raise ValueError(f"{name} must be 2-D [{what}, D], got shape {s}")
        if s[0] == 0:
            raise ValueError(f"{name} is empty (shape {s})")
    if si[1] != st[1]:
        raise ValueError(f"{n_img} has dim {si[1]} but {n_txt} has dim {st[1]}")
    g = validate_ground_truth(text_to_image, si[0], st[0], names=names)
    check_finite(image_emb, n_img)
    check_finite(text_emb, n_txt)
    return g


def check_option(value: str, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def caption_index(text_to_image: np.ndarray, n_images: int) -> np.ndarray:
    """Padded caption rows per image: [N_img, max_captions] int64, ``-1`` where an image has fewer."""
    g = np.asarray(text_to_image, dtype=np.int64)
    counts = np.bincount(g, minlength=n_images)
    order = np.argsort(g, kind="stable")
    starts = np.cumsum(counts) - counts
    slot = np.arange(len(g)) - np.repeat(starts, counts)
    caps = np.full((n_images, int(counts.max(initial=0))), -1, dtype=np.int64)
    caps[g[order], slot] = order
    return caps


def resolve_device(device: str | torch.device | None, *xs: ArrayLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def balanced_chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` chunks of at most ``size`` with near-equal lengths (no tiny tail block)."""
    n_chunks = max(1, math.ceil(n / max(1, size)))
    edges = np.linspace(0, n, n_chunks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def rows_for_budget(n_columns: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows of a [rows, n_columns] block of float32 scores plus its bool mask within ``memory_budget`` bytes."""
    return max(1, int(memory_budget) // (5 * max(1, n_columns)))


def dot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise float64 dot products of [n, D] arrays. The one formula for every exact score, so
    identical rows give bit-identical scores wherever they are computed (exact ties stay ties)."""
    return (a * b).sum(axis=1)


class Rows:
    """Rows of an [N, D] array (numpy, memmap or tensor) in float64, L2-normalised if asked, read
    on demand without holding a full copy.

    The float64 norm of every row is computed once (one scan), so a row comes out bit-identical
    whichever block it is read in. A zero-norm row raises ``ValueError`` naming ``name`` and the
    first such row unless ``degenerate="tie"``, where it stays zero (it scores 0 against everything,
    i.e. it ties with everything). Exact rows always live on the CPU (numpy); the filter copies
    built from them (:mod:`experiments.retrieval.precision`) go to the scoring device.
    """

    def __init__(self, x: ArrayLike, name: str, normalize: bool, degenerate: str = "error",
                 visit: Callable[[int, np.ndarray], None] | None = None) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach()
        self.x, self.name, self.n, self.normalize = x, name, _shape(x)[0], normalize
        norms = np.empty(self.n, dtype=np.float64)
        for s in range(0, self.n, _SCAN_ROWS):  # one scan: norms, and ``visit(start, exact rows)``
            r = self._raw(slice(s, s + _SCAN_ROWS))
            n = norms[s : s + len(r)] = np.sqrt(dot64(r, r))
            if visit is not None:
                visit(s, r / np.where(n == 0, 1.0, n)[:, None] if normalize else r)
        zero = np.flatnonzero(norms == 0)
        if len(zero) and degenerate == "error":
            raise ValueError(
                f"{name} has zero-norm rows (no direction to compare), first in row {int(zero[0])} "
                f"({len(zero)} of {self.n}); pass degenerate='tie' to score them as ties with everything")
        self.norms = norms
        self.n_zero = len(zero)
        self._div = np.where(norms == 0, 1.0, norms) if normalize else None

    def _raw(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(self.x, torch.Tensor):
            idx = key if isinstance(key, slice) else torch.from_numpy(np.asarray(key)).to(self.x.device)
            return self.x[idx].to(dtype=torch.float64).cpu().numpy()
        return np.asarray(self.x[key], dtype=np.float64)

    def get(self, key: slice | np.ndarray) -> np.ndarray:
        """Exact rows ``x[key]`` [n, D] float64 (a private copy), normalised if asked."""
        rows = np.array(self._raw(key), dtype=np.float64, copy=True, order="C")
        if self._div is not None:
            rows /= self._div[key, None]
        return rows
