"""Helpers shared by the datasets: fingerprints, seeded splits, flattened captions, cache manifests.

A cached directory carries a ``manifest.json`` (size and sha256 of every file, written last): :func:`check_manifest`
finds a missing, truncated (0-byte), replaced or swapped file. Sizes are checked on every open; the content once per
file per process: by the full sha256 up to 64 MiB (~200-400 MB/s here), by a sampled sha256 (4 MiB read) above.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


def fingerprint(name: str, version: int, config: dict[str, Any]) -> str:
    """Short stable hash of a dataset's name, generator version and config (JSON, sorted keys)."""
    blob = json.dumps({"name": name, "version": version, "config": config}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def replace_config(config: Any, overrides: dict[str, Any], what: str) -> Any:
    """``dataclasses.replace(config, **overrides)``, failing with the known option names on an unknown one."""
    import dataclasses

    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(config, **overrides)


def seeded_splits(
    n: int,
    fractions: dict[str, float],
    seed: int | Sequence[int],
    excluded: np.ndarray | None = None,
    excluded_name: str = "zeroshot",
) -> dict[str, np.ndarray]:
    """Disjoint sorted int64 index arrays covering ``range(n)``.

    Rows where ``excluded`` [n] is true go to ``excluded_name``; the others are shuffled with ``seed`` and cut in
    the order of ``fractions`` (the last split takes the remainder, so rounding never drops a row).
    """
    excluded = np.zeros(n, dtype=bool) if excluded is None else np.asarray(excluded, dtype=bool)
    pool = np.flatnonzero(~excluded)
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    names = list(fractions)
    splits: dict[str, np.ndarray] = {}
    start = 0
    for i, name in enumerate(names):
        stop = len(pool) if i == len(names) - 1 else start + int(round(fractions[name] * len(pool)))
        splits[name] = np.sort(pool[start:stop]).astype(np.int64)
        start = stop
    splits[excluded_name] = np.flatnonzero(excluded).astype(np.int64)
    return splits


def stratified_take(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (rest, taken): ``fraction`` of each class's rows taken (shuffled with ``seed``); both sorted
    int64. A class with two or more rows gives at least one row when ``fraction > 0``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(labels[rows]):
        r = rows[labels[rows] == c]
        r = r[rng.permutation(len(r))]
        k = int(round(fraction * len(r)))
        if fraction > 0 and k == 0 and len(r) >= 2:
            k = 1
        taken.append(r[:k])
    took = np.sort(np.concatenate(taken)).astype(np.int64) if taken else np.zeros(0, np.int64)
    return np.setdiff1d(rows, took).astype(np.int64), took


def check_fractions(fractions: dict[str, float]) -> None:
    """ValueError unless every fraction is in [0, 1] and they sum to 1."""
    for name, f in fractions.items():
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {f}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        terms = " + ".join(f"{k}={v}" for k, v in fractions.items())
        raise ValueError(f"split fractions must sum to 1, got {terms} = {total}")


class CaptionedSplits:
    """Mixin for datasets with ``captions: list[list[str]]`` (one list per image) and ``splits``."""

    captions: list[list[str]]
    splits: dict[str, np.ndarray]

    def indices(self, split: str | np.ndarray | None) -> np.ndarray:
        """Row indices of ``split`` (a split name, an index array, or None for all rows)."""
        if split is None:
            return np.arange(len(self.captions), dtype=np.int64)
        if isinstance(split, str):
            if split not in self.splits:
                raise KeyError(f"unknown split {split!r}; known splits: {', '.join(self.splits)}")
            return self.splits[split]
        idx = np.asarray(split, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(self.captions))):
            raise ValueError(f"index array must be 1-d with values in [0, {len(self.captions)}), got shape {idx.shape}")
        return idx

    def flat_captions(self, split: str | np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Captions of ``split`` flattened in image order and ``text_to_image`` [N_text] (rows of the split, 0..n-1)."""
        return flatten_captions([self.captions[i] for i in self.indices(split)])


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """``[[a, b], [c]] -> ([a, b, c], [0, 0, 1])``."""
    flat = [c for caps in captions for c in caps]
    t2i = np.repeat(np.arange(len(captions), dtype=np.int64), [len(c) for c in captions])
    return flat, t2i


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic containers (JSON, scene records).

    Its repeated passes over the growing heap would otherwise dominate: loading the JSON of 10k scenes is ~4x faster.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def save_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f, gc_paused():
        return json.load(f)


# ---------------------------------------------------------------------------------------------- manifests

MANIFEST = "manifest.json"
#: Files up to this size are checked by their full sha256 on first open; larger ones by a sampled sha256 (size,
#: and 64 blocks of 64 KiB spread evenly from the first byte to the last: 4 MiB read). Both are recorded at write.
FULL_HASH_MAX_BYTES = 64 << 20
_SAMPLE_BLOCKS, _SAMPLE_BLOCK = 64, 64 << 10
_verified: set[tuple] = set()  # (path, size, mtime_ns, inode, digest) whose content was checked in this process
_verified_lock = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sampled_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's size and 64 evenly spaced 64 KiB blocks (first and last included; whole file if
    smaller): catches truncation, swapped files and overwritten regions at a fixed 4 MiB of reading."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
            h.update(f.read())
        else:
            for i in range(_SAMPLE_BLOCKS):
                f.seek((size - _SAMPLE_BLOCK) * i // (_SAMPLE_BLOCKS - 1))
                h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256", "sampled_sha256"}`` of one file (and remember it as verified in this process)."""
    digest, sampled = sha256_file(path), sampled_sha256(path)
    st = os.stat(path)
    with _verified_lock:
        _verified.add((str(path), st.st_size, st.st_mtime_ns, st.st_ino, digest))
        _verified.add((str(path), st.st_size, st.st_mtime_ns, st.st_ino, sampled))
    return {"size": st.st_size, "sha256": digest, "sampled_sha256": sampled}


def check_file(path: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """Why ``path`` does not match ``record`` (from :func:`file_record`), or ``None`` if it does.

    The size is compared on every call; the content once per (file, size, mtime, inode) per process: by its full
    sha256 up to :data:`FULL_HASH_MAX_BYTES` (a few hundred MB/s), by the sampled sha256 above.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{Path(path).name} is missing"
    if st.st_size != record["size"]:
        return f"{Path(path).name} has {st.st_size} bytes, {record['size']} expected"
    sampled = st.st_size > FULL_HASH_MAX_BYTES and "sampled_sha256" in record
    expected = record["sampled_sha256"] if sampled else record["sha256"]
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, expected)
    if key in _verified:
        return None
    if (sampled_sha256(path) if sampled else sha256_file(path)) != expected:
        what = "sampled sha256" if sampled else "sha256"
        return f"{Path(path).name} has different content than when it was written ({what} mismatch: damaged or replaced)"
    with _verified_lock:
        _verified.add(key)
    return None


def write_manifest(directory: Path) -> dict[str, Any]:
    """Record every file under ``directory`` (relative POSIX paths) in ``directory/manifest.json``; call it last."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): file_record(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": 1, "files": files}
    save_json(directory / MANIFEST, manifest)
    return manifest


def check_manifest(directory: Path, only: Sequence[str] | None = None) -> str | None:
    """Why the files under ``directory`` differ from its manifest (first problem found), or ``None``.

    ``only`` limits the check to those relative paths (each must be in the manifest).
    """
    directory = Path(directory)
    try:
        manifest = load_json(directory / MANIFEST)
        files = manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written by an older version, or not by alignfuse)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for rel in (files if only is None else only):
        if rel not in files:
            return f"{rel} is not in its {MANIFEST}"
        problem = check_file(directory / rel, files[rel])
        if problem is not None:
            return problem.replace(Path(rel).name, rel, 1)
    return None
