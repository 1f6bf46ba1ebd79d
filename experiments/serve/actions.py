"""The page's actions as plain functions over a :class:`~experiments.serve.source.RunSource`.

Each returns a JSON-able dict (what the page renders and what API clients get) and raises
:class:`ServeError` (bad input) or :class:`~experiments.serve.source.Unavailable` (the run cannot do
it) with a message for the page. Scores are cosine similarities in each aligner's shared space.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from experiments.serve.source import RunSource, Unavailable

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 2**20  # larger uploads are refused (the server also caps them before this)
MAX_UPLOAD_PIXELS = 40_000_000
MAX_QUERY_CHARS = 500
MAX_K = 20


class ServeError(ValueError):
    """Bad input from the page or an API client; ``str(e)`` is shown in the page."""


def _check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ServeError(f"k must be a whole number, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise ServeError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ServeError(f"type a {what} first (it is empty)")
    text = " ".join(text.split())
    if len(text) > MAX_QUERY_CHARS:
        raise ServeError(f"the {what} is {len(text)} characters long; at most {MAX_QUERY_CHARS} are accepted")
    return text


def _need_aligners(src: RunSource) -> None:
    if not src.names:
        raise Unavailable(f"{src.run_dir.name} has no aligners (a bridge run): ask the image instead")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``scores`` [N], best first."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


# ------------------------------------------------------------------------ text → images


def text_to_images(src: RunSource, query: Any, k: Any = 5) -> dict[str, Any]:
    """Top-``k`` test images per aligner for ``query``; ``true`` marks the images the query is a caption of."""
    query, k = _check_text(query, "query"), _check_k(k)
    _need_aligners(src)
    rows = src.caption_rows(query)
    true = sorted({int(src.gallery.caption_owner[j]) for j in rows})
    out: dict[str, Any] = {"query": query, "is_test_caption": bool(rows), "true_images": true, "aligners": {}}
    for name in src.names:
        try:
            q = src.encode_texts(name, [query])[0]
        except Unavailable as e:
            out["aligners"][name] = {"hits": [], "note": str(e)}
            continue
        scores = src.image_emb[name] @ q
        hits = [{"image": int(i), "score": round(float(scores[i]), 4), "true": int(i) in true}
                for i in _top(scores, k)]
        note = None if src.live(name) else "test caption: its saved embedding (no live encoder for this run)"
        out["aligners"][name] = {"hits": hits, "note": note}
    if not any(a["hits"] for a in out["aligners"].values()):
        raise Unavailable("no aligner of this run can encode new text; type one of the test captions instead "
                          f"(e.g. {src.gallery.captions[0]!r}). Why: {next(iter(out['aligners'].values()))['note']}")
    return out


# ------------------------------------------------------------------------ image → captions


def check_row(src: RunSource, row: Any) -> int:
    try:
        row = int(row)
    except (TypeError, ValueError):
        raise ServeError(f"pick a gallery image (its number), got {row!r}") from None
    if not 0 <= row < len(src.gallery.images):
        raise ServeError(f"gallery image {row} does not exist: the gallery has images 0-{len(src.gallery.images) - 1}")
    return row


def decode_upload(path: Any, size: int, upload_root: str | Path | None = None) -> np.ndarray:
    """An uploaded PNG/JPEG file → uint8 [size, size, 3] (shorter side resized, centre-cropped)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, dict):  # an API client's FileData
        path = path.get("path")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ServeError("no uploaded file")
    p = Path(path).resolve()
    if upload_root is not None and not p.is_relative_to(Path(upload_root).resolve()):
        raise ServeError("uploads are read only from the server's upload folder")
    if not p.is_file():
        raise ServeError("the uploaded file is gone; upload it again")
    n_bytes = p.stat().st_size
    if n_bytes > MAX_UPLOAD_BYTES:
        raise ServeError(f"the upload is {n_bytes / 2**20:.1f} MB; at most {MAX_UPLOAD_BYTES // 2**20} MB are accepted")
    try:
        with Image.open(p) as im:
            if im.format not in ("PNG", "JPEG"):
                raise ServeError(f"the upload is a {im.format or 'unknown'} file; upload a PNG or JPEG image")
            if im.width * im.height > MAX_UPLOAD_PIXELS:
                raise ServeError(f"the image is {im.width}x{im.height} pixels; at most {MAX_UPLOAD_PIXELS:,} are accepted")
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ServeError(f"the upload is not a readable PNG or JPEG image ({type(e).__name__})") from None
    scale = size / min(im.width, im.height)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def image_to_captions(src: RunSource, row: Any = None, upload: Any = None, k: Any = 5,
                      upload_root: str | Path | None = None) -> dict[str, Any]:
    """Top-``k`` test captions per aligner for gallery image ``row`` or an uploaded image (the upload wins: a file,
    or the image already decoded by :func:`decode_upload`, uint8 [S, S, 3])."""
    k = _check_k(k)
    _need_aligners(src)
    if isinstance(upload, np.ndarray):
        image, row_, source = upload, None, "upload"
    elif upload:
        image = decode_upload(upload, src.image_size, upload_root)
        row_, source = None, "upload"
    else:
        row_ = check_row(src, row)
        image, source = None, f"gallery image {row_}"
    out: dict[str, Any] = {"image": source, "row": row_, "aligners": {}}
    for name in src.names:
        try:
            v = src.image_emb[name][row_] if image is None else src.encode_images(name, image[None])[0]
        except Unavailable as e:
            out["aligners"][name] = {"hits": [], "note": str(e)}
            continue
        scores = src.text_emb[name] @ v
        hits = [{"caption": src.gallery.captions[j], "score": round(float(scores[j]), 4),
                 "true": row_ is not None and int(src.gallery.caption_owner[j]) == row_} for j in _top(scores, k)]
        out["aligners"][name] = {"hits": hits, "note": None}
    if not any(a["hits"] for a in out["aligners"].values()):
        raise Unavailable("no aligner of this run can encode new images; pick a gallery image instead. Why: "
                          f"{next(iter(out['aligners'].values()))['note']}")
    if row_ is not None:
        out["true_captions"] = src.gallery.captions_of(row_)
    return out


# ------------------------------------------------------------------------ binding probe


def suggest_edits(src: RunSource, row: Any) -> dict[str, Any]:
    """A true caption of gallery image ``row`` and the run data's minimal false edits of its captions."""
    row = check_row(src, row)
    edits = [{"caption": s, "edited": e, "kind": kind} for s, e, kind in src.gallery.hard_negatives[row]]
    return {"row": row, "captions": src.gallery.captions_of(row), "edits": edits}


def binding_probe(src: RunSource, row: Any, caption: Any, edited: Any) -> dict[str, Any]:
    """Each aligner's score of gallery image ``row`` with ``caption`` and with the ``edited`` caption."""
    row = check_row(src, row)
    caption, edited = _check_text(caption, "caption"), _check_text(edited, "edited caption")
    _need_aligners(src)
    out: dict[str, Any] = {"row": row, "caption": caption, "edited": edited, "aligners": {}}
    for name in src.names:
        try:
            t = src.encode_texts(name, [caption, edited])
        except Unavailable as e:
            out["aligners"][name] = {"note": str(e)}
            continue
        a, b = (float(x) for x in t @ src.image_emb[name][row])
        out["aligners"][name] = {"caption": round(a, 4), "edited": round(b, 4), "change": round(b - a, 4),
                                 "prefers_caption": a > b, "note": None}
    if not any("change" in a for a in out["aligners"].values()):
        raise Unavailable("no aligner of this run can encode edited captions. Why: "
                          f"{next(iter(out['aligners'].values()))['note']}")
    return out


# ------------------------------------------------------------------------ ask the image


def _image_for(src: RunSource, row: Any, upload: Any, upload_root: str | Path | None) -> tuple[np.ndarray, str]:
    if upload:
        return decode_upload(upload, src.image_size, upload_root), "upload"
    row = check_row(src, row)
    return np.asarray(src.gallery.images[row]), f"gallery image {row}"


def ask(src: RunSource, row: Any, upload: Any, question: Any, upload_root: str | Path | None = None) -> dict[str, Any]:
    """The trained bridge's answer to ``question`` about the image."""
    question = _check_text(question, "question")
    lm = src.bridge()
    image, source = _image_for(src, row, upload, upload_root)
    answer = lm.chat(image[None], question)
    if isinstance(answer, (list, tuple)):
        answer = answer[0]
    return {"image": source, "question": question, "answer": str(answer).strip()}


def caption(src: RunSource, row: Any, upload: Any, upload_root: str | Path | None = None) -> dict[str, Any]:
    """The trained bridge's caption of the image."""
    lm = src.bridge()
    image, source = _image_for(src, row, upload, upload_root)
    fn = getattr(lm, "caption", None) or lm.generate
    text = fn(image[None])
    if isinstance(text, (list, tuple)):
        text = text[0]
    return {"image": source, "caption": str(text).strip()}
