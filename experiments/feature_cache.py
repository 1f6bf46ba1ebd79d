"""The on-disk feature cache: one entry per (encoder name, dataset fingerprint, split), checked on load."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from align.weights import cache_root, clean_stale_temps, write_file_atomically
from experiments.data._common import check_file, file_record

log = logging.getLogger(__name__)

Features = dict[str, np.ndarray]


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
