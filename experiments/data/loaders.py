"""A user's own image–text data, in the formats the field uses.

* open_clip-style CSV (:func:`load_csv`): columns ``filepath`` and ``title``, tab-separated by default, as
  ``open_clip_train`` reads them; several rows may name the same image (grouped, first appearance order).
* Karpathy-split JSON of COCO / Flickr8k / Flickr30k (:func:`load_karpathy`):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", ...}]}]}``.
* precomputed embeddings (:func:`load_embedding_pairs`): ``.npy`` files of image and text embeddings and an
  optional caption → image index.

Images are read lazily with PIL (RGB; resized to the shorter side then centre-cropped, as CLIP preprocessing
does). Bad input stops with an error naming the file and the row, line or field at fault: ``FileNotFoundError``
for missing files, ``ValueError`` for everything malformed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ImageTextData:
    """Images named by path, captions flattened in image order, and ``text_to_image`` [N_text] (image rows).

    ``image_where[i]`` says where image ``i`` was first named ("line 7", "images[12]") for error messages;
    ``fingerprint`` hashes the annotation file's bytes, the image root and the selection (not the image bytes).
    """

    image_paths: list[str]
    captions: list[str]
    text_to_image: np.ndarray
    fingerprint: str
    source: str
    image_where: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """Captions and ``text_to_image``, as ShapesWorld's ``flat_captions`` gives them."""
        return list(self.captions), self.text_to_image.copy()

    def captions_of(self, i: int) -> list[str]:
        """The captions of image ``i``."""
        return [c for c, j in zip(self.captions, self.text_to_image) if j == i]

    def load_image(self, i: int, size: int | None = None) -> np.ndarray:
        """Image ``i`` as uint8 [H, W, 3] RGB; with ``size``, shorter side resized to it and centre-cropped square."""
        from PIL import Image, ImageOps

        path = self.image_paths[i]
        where = f"{self.source}, {self.image_where[i]}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path} not found (named in {where})")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size is not None:
                    im = ImageOps.fit(im, (size, size), method=Image.BICUBIC)
                return np.asarray(im, dtype=np.uint8)
        except OSError as e:  # PIL: unidentified or truncated image
            raise ValueError(f"cannot read image {path} (named in {where}): {e}") from e

    def iter_images(self, size: int, batch_size: int = 64) -> Iterator[np.ndarray]:
        """Batches of images, uint8 [B, size, size, 3], in image order."""
        for start in range(0, len(self), batch_size):
            yield np.stack([self.load_image(i, size) for i in range(start, min(len(self), start + batch_size))])

    def load_images(self, size: int, batch_size: int = 64) -> np.ndarray:
        """All images, uint8 [N, size, size, 3] (with a progress bar on long runs)."""
        from tqdm.auto import tqdm

        out = np.empty((len(self), size, size, 3), dtype=np.uint8)
        batches = self.iter_images(size, batch_size)
        for b, batch in enumerate(tqdm(batches, total=-(-len(self) // batch_size), desc="images", disable=None)):
            out[b * batch_size:b * batch_size + len(batch)] = batch
        return out


def _file_hash(path: Path, *extra: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    for e in extra:
        h.update(b"\0" + e.encode())
    return h.hexdigest()[:16]


def _bad_utf8(path: Path) -> str:
    """Where a file stops being UTF-8: "line L, byte B of the line: not UTF-8 (0xff)"."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"line {lineno}, byte {e.start + 1} of the line: not UTF-8 (0x{line[e.start]:02x}); "
                        "save the file as UTF-8")
    return "not UTF-8; save the file as UTF-8"


def _long_line(path: Path) -> int | None:
    """Number of the first line longer than csv's field size limit (the reader's own count lags behind)."""
    limit = csv.field_size_limit()
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if len(line) > limit:
                return lineno
    return None


def _resolve(p: str, image_root: str | Path | None) -> str:
    return str(Path(image_root) / p) if image_root is not None else p


def _build(paths: Sequence[str], caps: Sequence[str], wheres: Sequence[str], source: Path, fp: str,
           check_files: bool) -> ImageTextData:
    index: dict[str, int] = {}
    image_paths: list[str] = []
    image_where: list[str] = []
    t2i = np.empty(len(caps), dtype=np.int64)
    for k, (p, w) in enumerate(zip(paths, wheres)):
        if p not in index:
            index[p] = len(image_paths)
            image_paths.append(p)
            image_where.append(w)
        t2i[k] = index[p]
    if check_files:
        for p, w in zip(image_paths, image_where):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"image {p} not found (named in {source}, {w})")
    return ImageTextData(image_paths=image_paths, captions=list(caps), text_to_image=t2i, fingerprint=fp,
                         source=str(source), image_where=image_where)


def load_csv(
    path: str | Path,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str = "\t",
    image_root: str | Path | None = None,
    check_files: bool = True,
) -> ImageTextData:
    """Read an open_clip-style CSV (one row per caption; rows sharing an image path are grouped).

    Image paths are taken as written (relative ones relative to the working directory, as open_clip does), or
    joined to ``image_root`` when given. ``check_files`` checks up front that every image file exists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} not found")
    paths, caps, wheres = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        reader = csv.DictReader(f, delimiter=sep)
        try:
            columns = reader.fieldnames or []
            missing = [k for k in (img_key, caption_key) if k not in columns]
            if missing:
                raise ValueError(
                    f"{path}: no column {' or '.join(repr(m) for m in missing)}; columns found: "
                    f"{', '.join(repr(c) for c in columns) or '(none)'} (separator {sep!r})"
                )
            for row in reader:
                where = f"line {reader.line_num}"
                spill = sum(str(v).rstrip("\r\n").count("\n") for v in row.values())
                if spill:  # a quoted field ran over line ends: the rows it swallowed would silently merge
                    raise ValueError(f"{path}, line {reader.line_num - spill}: a field runs on to line "
                                     f"{reader.line_num} (an unmatched '\"' quote?); remove the stray quote or "
                                     "quote the whole field")
                if None in row:
                    raise ValueError(f"{path}, {where}: {len(columns) + len(row[None])} fields but the header has "
                                     f"{len(columns)} (separator {sep!r})")
                img, cap = (row.get(img_key) or "").strip(), (row.get(caption_key) or "").strip()
                if not img:
                    raise ValueError(f"{path}, {where}: empty image path in column {img_key!r}")
                if not cap:
                    raise ValueError(f"{path}, {where}: empty caption in column {caption_key!r}")
                paths.append(_resolve(img, image_root))
                caps.append(cap)
                wheres.append(where)
        except csv.Error as e:  # e.g. "field larger than field limit (131072)"
            raise ValueError(f"{path}, line {_long_line(path) or reader.line_num}: {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: {_bad_utf8(path)}") from e
    if not caps:
        raise ValueError(f"{path}: no rows after the header")
    fp = _file_hash(path, str(image_root), img_key, caption_key, sep)
    data = _build(paths, caps, wheres, path, fp, check_files)
    log.info("%s: %d images, %d captions", path, len(data), len(caps))
    return data


def load_karpathy(
    path: str | Path,
    image_root: str | Path,
    split: str | None = "test",
    check_files: bool = True,
) -> ImageTextData:
    """Read a Karpathy-split JSON (COCO, Flickr8k/30k) and keep the images of ``split``.

    Image ``i`` is ``image_root/filepath/filename`` (``filepath`` is optional, as in Flickr30k). ``split="train"``
    includes ``"restval"`` (as in the usual 113k COCO training set); ``split=None`` keeps every image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Karpathy JSON file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {_bad_utf8(path)}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        found = ", ".join(repr(k) for k in doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: no 'images' list at the top level (found: {found or '(empty)'})")
    wanted = {"train": {"train", "restval"}}.get(split, {split}) if split is not None else None
    paths, caps, wheres = [], [], []
    seen_splits: set[str] = set()
    for i, im in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) or not im["filename"]:
            raise ValueError(f"{path}: {where} has no 'filename'")
        if wanted is not None and "split" not in im:
            raise ValueError(f"{path}: {where} ({im['filename']}) has no 'split'")
        seen_splits.add(str(im.get("split")))
        if wanted is not None and im["split"] not in wanted:
            continue
        sentences = im.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{path}: {where} ({im['filename']}) has no 'sentences' (an image with no caption)")
        file = _resolve(str(Path(im.get("filepath") or "") / im["filename"]), image_root)
        for j, sent in enumerate(sentences):
            if not isinstance(sent, dict) or "raw" not in sent:
                raise ValueError(f"{path}: {where}.sentences[{j}] has no 'raw'")
            if not isinstance(sent["raw"], str):
                raise ValueError(f"{path}: {where}.sentences[{j}] ({im['filename']}): 'raw' is "
                                 f"{json.dumps(sent['raw'])}, not a caption string")
            raw = sent["raw"].strip()
            if not raw:
                raise ValueError(f"{path}: {where}.sentences[{j}] has an empty 'raw'")
            paths.append(file)
            caps.append(raw)
            wheres.append(where)
    if not caps:
        raise ValueError(f"{path}: no image in split {split!r}; splits found: {', '.join(sorted(seen_splits))}")
    fp = _file_hash(path, str(image_root), str(split))
    data = _build(paths, caps, wheres, path, fp, check_files)
    log.info("%s [%s]: %d images, %d captions", path, split, len(data), len(caps))
    return data


# --------------------------------------------------------------------------------------------- embeddings


@dataclass(eq=False)
class EmbeddingPairs:
    """Validated embeddings: image_emb float32 [N_img, D_img], text_emb float32 [N_text, D_text] (memory-mapped
    when stored as float32), text_to_image int64 [N_text] in [0, N_img) with every image captioned."""

    image_emb: np.ndarray
    text_emb: np.ndarray
    text_to_image: np.ndarray
    fingerprint: str


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy array: {e}") from e


def _check_embeddings(arr: np.ndarray, path: Path, block_rows: int = 65536) -> np.ndarray:
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-d array [N, D], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{path}: expected real numbers, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{path}: empty array of shape {arr.shape}")
    for start in range(0, arr.shape[0], block_rows):  # blockwise: the file may be larger than memory
        ok = np.isfinite(arr[start:start + block_rows]).all(axis=1)
        if not ok.all():
            raise ValueError(f"{path}: row {start + int(np.argmin(ok))} contains NaN or Inf")
    if arr.dtype != np.float32:
        log.info("%s: converting %s to float32 (in memory)", path, arr.dtype)
        arr = np.asarray(arr, dtype=np.float32)
    return arr


def load_embedding_pairs(
    image_npy: str | Path,
    text_npy: str | Path,
    text_to_image_npy: str | Path | None = None,
) -> EmbeddingPairs:
    """Load and validate precomputed embedding pairs.

    Without ``text_to_image_npy``, text row ``i`` describes image row ``i`` (equal lengths required).
    Errors name the file and the first bad row: wrong ndim, NaN/Inf, mismatched lengths, an index out of range,
    an image with no caption.
    """
    image_npy, text_npy = Path(image_npy), Path(text_npy)
    img = _check_embeddings(_load_npy(image_npy), image_npy)
    txt = _check_embeddings(_load_npy(text_npy), text_npy)
    n_img, n_txt = len(img), len(txt)
    if text_to_image_npy is None:
        if n_img != n_txt:
            raise ValueError(
                f"{text_npy} has {n_txt} rows but {image_npy} has {n_img}; "
                "pass text_to_image_npy to map several captions to one image"
            )
        t2i = np.arange(n_img, dtype=np.int64)
    else:
        t2i_path = Path(text_to_image_npy)
        raw = _load_npy(t2i_path)
        if raw.ndim != 1:
            raise ValueError(f"{t2i_path}: expected a 1-d index array [N_text], got shape {raw.shape}")
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"{t2i_path}: expected integer image indices, got dtype {raw.dtype}")
        if len(raw) != n_txt:
            raise ValueError(f"{t2i_path} has {len(raw)} rows but {text_npy} has {n_txt}")
        t2i = np.asarray(raw, dtype=np.int64)
        bad = np.flatnonzero((t2i < 0) | (t2i >= n_img))
        if len(bad):
            raise ValueError(
                f"{t2i_path}: row {bad[0]} points to image {t2i[bad[0]]}, outside [0, {n_img}) ({image_npy})"
            )
        counts = np.bincount(t2i, minlength=n_img)
        if (counts == 0).any():
            raise ValueError(f"{image_npy}: row {int(np.argmin(counts))} has no caption in {t2i_path}")
    files = [image_npy, text_npy] + ([Path(text_to_image_npy)] if text_to_image_npy is not None else [])
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    fp = hashlib.sha256(stamp.encode()).hexdigest()[:16]  # path, size and mtime: hashing GBs would be slow
    return EmbeddingPairs(image_emb=img, text_emb=txt, text_to_image=t2i, fingerprint=fp)


__all__ = ["ImageTextData", "EmbeddingPairs", "load_csv", "load_karpathy", "load_embedding_pairs"]
