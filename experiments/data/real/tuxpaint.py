"""Tux Paint stamps: ~700 real photo cut-outs and drawings, each with a one-line English caption.

Layout (``usr/share/tuxpaint/stamps`` of Debian's ``tuxpaint-stamps-default``, what ``alignfuse fetch tuxpaint``
stores): ``<category>/**/<stamp>.{png,svg}`` beside ``<stamp>.txt``, whose first line is the English caption ("A
chimpanzee."; translations follow). The category folder (animals, food, vehicles, ...) is the label; ``symbols/``
(letters, digits, coins) is left out; ``*_mirror.png`` (Tux Paint's pre-mirrored variants) are not separate stamps.
A stamp with both files is taken from its SVG (as Tux Paint does) when ``rsvg-convert`` is available.

:func:`load_tuxpaint` prepares every stamp once into the dataset cache as an RGB PNG of ``size`` x ``size``:
transparent backgrounds composited on white, the stamp scaled to fit and centred (SVGs rendered by
``rsvg-convert`` at that size). Without ``rsvg-convert`` SVG-only stamps are skipped with a logged count.
A stamp image without its caption file, an unreadable image or an empty caption stops with an error naming the file.
"""
from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.data.loaders import ImageTextData
from experiments.data.real._split import train_val_test

log = logging.getLogger(__name__)

EXCLUDED = ("symbols",)
_VERSION = 1


@dataclass(eq=False)
class TuxPaintData(ImageTextData):
    """:class:`ImageTextData` (one caption per image, ``image_paths`` the prepared PNGs) plus ``labels`` int64 [N]
    (category index), ``class_names``, ``stamps`` (source file of each image, relative to the stamps folder) and
    ``splits`` train/val/test (sorted int64 rows; stratified by category with ``seed``)."""

    labels: np.ndarray
    class_names: list[str]
    stamps: list[str]
    splits: dict[str, np.ndarray]

    def subset(self, split: str) -> ImageTextData:
        """The images and captions of one split as plain :class:`ImageTextData` (rows renumbered 0..n-1)."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; known splits: {', '.join(self.splits)}")
        idx = self.splits[split]
        return ImageTextData(image_paths=[self.image_paths[i] for i in idx], captions=[self.captions[i] for i in idx],
                             text_to_image=np.arange(len(idx), dtype=np.int64),
                             fingerprint=f"{self.fingerprint}-{split}", source=self.source,
                             image_where=[self.image_where[i] for i in idx])


def find_rsvg(root: Path | None = None) -> str | None:
    """``rsvg-convert`` on PATH, else the copy ``alignfuse fetch tuxpaint`` put in ``tools/`` (of ``root`` or of the
    fetched data set), else None."""
    from experiments.data.fetch import dataset_dir

    found = shutil.which("rsvg-convert")
    if found:
        return found
    for base in ([root] if root is not None else []) + [dataset_dir("tuxpaint")]:
        cand = Path(base) / "tools" / "rsvg-convert"
        if cand.is_file():
            return str(cand)
    return None


def caption_of(txt: Path) -> str:
    """First line of a stamp's description file, stripped; errors name the file."""
    try:
        with open(txt, encoding="utf-8") as f:
            first = f.readline().strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{txt}: not UTF-8 ({e})") from e
    if not first:
        raise ValueError(f"{txt}, line 1: empty caption")
    return first


def scan(root: Path, rsvg: str | None) -> tuple[list[Path], list[str], list[str], dict[str, int]]:
    """Stamp image files, captions, categories, and counts of what was skipped (and why)."""
    if not root.is_dir():
        raise FileNotFoundError(f"Tux Paint stamps folder {root} not found")
    files, caps, cats = [], [], []
    skipped = {"svg_without_renderer": 0, "caption_without_image": 0, "mirror_variant": 0}
    for txt in sorted(root.rglob("*.txt")):
        rel = txt.relative_to(root)
        if rel.parts[0] in EXCLUDED or len(rel.parts) < 2 or rel.parts[0] == "tools":
            continue
        svg, png = txt.with_suffix(".svg"), txt.with_suffix(".png")
        image = svg if svg.is_file() and rsvg else png if png.is_file() else None
        if image is None:
            skipped["svg_without_renderer" if svg.is_file() else "caption_without_image"] += 1
            continue
        files.append(image)
        caps.append(caption_of(txt))
        cats.append(rel.parts[0])
    for img in sorted([*root.rglob("*.png"), *root.rglob("*.svg")]):
        rel = img.relative_to(root)
        if rel.parts[0] in EXCLUDED or rel.parts[0] == "tools":
            continue
        if img.stem.endswith("_mirror") and img.with_name(img.stem[:-7] + img.suffix).exists():
            skipped["mirror_variant"] += 1
        elif not img.with_suffix(".txt").is_file():
            raise FileNotFoundError(f"stamp {img} has no caption file {img.with_suffix('.txt')}")
    if not files:
        raise ValueError(f"{root}: no stamp images with captions (expected <category>/**/<stamp>.png + <stamp>.txt)")
    return files, caps, cats, skipped


def prepare_image(src: Path, size: int, rsvg: str | None) -> "Image.Image":  # noqa: F821
    """The stamp as an RGB ``size`` x ``size`` PIL image on white (scaled to fit, centred). Errors name the file."""
    from PIL import Image

    try:
        if src.suffix == ".svg":
            if rsvg is None:
                raise ValueError("no rsvg-convert to render it")
            proc = subprocess.run([rsvg, "-w", str(size), "-h", str(size), "-a", "-f", "png", str(src)],
                                  capture_output=True, timeout=120)
            if proc.returncode != 0:
                raise ValueError(proc.stderr.decode(errors="replace").strip()[-300:])
            im = Image.open(io.BytesIO(proc.stdout))
        else:
            im = Image.open(src)
        im.load()
        im = im.convert("RGBA")
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise ValueError(f"cannot read stamp image {src}: {e}") from e
    if max(im.size) != size:  # small stamps (median longest side ~136 px) are scaled up to fill the square
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas.convert("RGB")


def load_tuxpaint(
    path: str | Path | None = None,
    size: int = 128,
    val_fraction: float = 0.1,
    test_fraction: float = 0.4,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    fetch: bool = True,
) -> TuxPaintData:
    """Load (and on first use prepare) the stamps. ``path``: a stamps folder (default: the fetched copy);
    ``cache_dir``: where prepared images go (default ``cache_root()/datasets``). The split is stratified by
    category with ``seed`` (default 50 / 10 / 40 % train / val / test: a large test set keeps chance R@10 low)."""
    from align.weights import write_dir_atomically
    from experiments.data.fetch import dataset_dir, find_data

    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    root = find_data("tuxpaint", path, fetch_missing=fetch)
    rsvg = find_rsvg(root)
    files, caps, cats, skipped = scan(root, rsvg)
    if skipped["svg_without_renderer"]:
        log.warning("no rsvg-convert: skipping %d SVG-only stamps (run `alignfuse fetch tuxpaint` or install "
                    "librsvg2-bin)", skipped["svg_without_renderer"])
    log.info("tuxpaint: %d stamps from %s (skipped: %s)", len(files), root, skipped)
    h = hashlib.sha256(f"v{_VERSION}|{size}|{bool(rsvg)}".encode())
    for f, c in zip(files, caps):
        h.update(f"{f.relative_to(root)}|{f.stat().st_size}|{c}\n".encode())
    fp = h.hexdigest()[:16]
    out = dataset_dir(f"tuxpaint-prepared-{fp}", cache_dir)
    names = [f"{i:04d}.png" for i in range(len(files))]

    def write(tmp: Path) -> None:
        for src, name in zip(files, names):
            prepare_image(src, size, rsvg).save(tmp / name)

    if not all((out / n).is_file() for n in names):
        log.info("tuxpaint: preparing %d images of %d px into %s", len(files), size, out)
        if out.exists():
            shutil.rmtree(out)
        write_dir_atomically(out, write, complete=lambda d: all((d / n).is_file() for n in names))
    class_names = sorted(set(cats))
    labels = np.asarray([class_names.index(c) for c in cats], dtype=np.int64)
    splits = train_val_test(labels, val_fraction, test_fraction, seed)
    stamps = [str(f.relative_to(root)) for f in files]
    return TuxPaintData(image_paths=[str(out / n) for n in names], captions=caps,
                        text_to_image=np.arange(len(files), dtype=np.int64),
                        fingerprint=f"{fp}-{seed}-{val_fraction}-{test_fraction}", source=str(root),
                        image_where=[f"stamp {s}" for s in stamps], labels=labels, class_names=class_names,
                        stamps=stamps, splits=splits)
