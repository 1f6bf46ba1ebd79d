"""HTML for the page: results of :mod:`experiments.serve.actions` as side-by-side columns per aligner.

Thumbnails are inline JPEG data URIs (the gallery is fixed, so each is encoded once, ~3 KB at 96 px), so
the page never asks the server for a file by path.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

CSS = """
.af-cols {display: flex; gap: 14px; flex-wrap: wrap; align-items: flex-start}
.af-col {flex: 1 1 160px; min-width: 150px; border: 1px solid #ddd; border-radius: 8px; padding: 8px}
.af-col h4 {margin: 0 0 6px 0; font-size: 15px}
.af-hit {display: flex; gap: 6px; align-items: center; margin: 4px 0; font-size: 13px}
.af-hit img {width: 72px; height: 72px; border-radius: 4px; border: 3px solid transparent}
.af-hit.af-true img {border-color: #1a9c3c}
.af-true .af-mark {color: #1a9c3c; font-weight: bold}
.af-note {color: #8a6d00; font-size: 12px}
.af-msg {padding: 10px; border-radius: 6px; background: #fff4e0; border: 1px solid #f0b050}
.af-cap {font-size: 13px; margin: 3px 0}
table.af-probe td, table.af-probe th {padding: 3px 10px; text-align: right}
table.af-probe td:first-child, table.af-probe th:first-child {text-align: left}
"""


class Thumbnails:
    """JPEG data URIs of gallery images at ``size`` px, encoded on first use (a tiled gallery's repeats share one)."""

    def __init__(self, images: Any, size: int = 96) -> None:
        self.images, self.size = images, size
        self._base = getattr(images, "base_row", lambda row: row)
        self._uri: dict[int, str] = {}

    def __call__(self, row: int) -> str:
        key = self._base(row)
        uri = self._uri.get(key)
        if uri is None:
            uri = self._uri[key] = image_uri(np.asarray(self.images[row]), self.size)
        return uri


def image_uri(image: np.ndarray, size: int | None = None) -> str:
    """uint8 [H, W, 3] → ``data:image/jpeg;base64,…`` (resized to ``size`` px on its longer side)."""
    from PIL import Image

    im = Image.fromarray(image)
    if size is not None and max(im.size) > size:
        im.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def message(text: str) -> str:
    return f'<div class="af-msg">{html.escape(text)}</div>'


def _note(note: str | None) -> str:
    return f'<div class="af-note">{html.escape(note)}</div>' if note else ""


def images_html(result: dict[str, Any], thumbs: Thumbnails) -> str:
    """Text → images: one column per aligner, top-k thumbnails with scores, true matches ✓ and green."""
    head = (f"<p>Query is a test caption of image(s) {', '.join(map(str, result['true_images']))}: "
            "true matches are marked ✓.</p>" if result["is_test_caption"] else
            "<p>Not one of the test captions, so no image is marked as its true match.</p>")
    cols = []
    for name, r in result["aligners"].items():
        hits = "".join(
            f'<div class="af-hit{" af-true" if h["true"] else ""}" data-image="{h["image"]}">'
            f'<img src="{thumbs(h["image"])}" alt="test image {h["image"]}">'
            f'<span><span class="af-mark">{"✓ " if h["true"] else ""}</span>#{h["image"]}<br>{h["score"]:.3f}</span></div>'
            for h in r["hits"])
        cols.append(f'<div class="af-col" data-aligner="{html.escape(name)}"><h4>{html.escape(name)}</h4>'
                    f'{_note(r.get("note"))}{hits}</div>')
    return head + f'<div class="af-cols">{"".join(cols)}</div>'


def captions_html(result: dict[str, Any], uri: str) -> str:
    """Image → captions: the image, then one column per aligner of top-k captions (✓ = a true caption)."""
    cols = []
    for name, r in result["aligners"].items():
        hits = "".join(
            f'<div class="af-cap{" af-true" if h["true"] else ""}"><span class="af-mark">{"✓" if h["true"] else "·"}</span> '
            f'{h["score"]:.3f} {html.escape(h["caption"])}</div>' for h in r["hits"])
        cols.append(f'<div class="af-col" data-aligner="{html.escape(name)}"><h4>{html.escape(name)}</h4>'
                    f'{_note(r.get("note"))}{hits}</div>')
    return (f'<div class="af-hit"><img src="{uri}" alt="query image"><span>{html.escape(result["image"])}'
            f'</span></div><div class="af-cols">{"".join(cols)}</div>')


def probe_html(result: dict[str, Any]) -> str:
    """Binding probe: per aligner the score with the caption, with the edit, and the change."""
    rows = []
    for name, r in result["aligners"].items():
        if "change" not in r:
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan=4>{_note(r['note'])}</td></tr>")
            continue
        verdict = "✓ caption wins" if r["prefers_caption"] else "✗ edit wins"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{r['caption']:.3f}</td><td>{r['edited']:.3f}</td>"
                    f"<td>{r['change']:+.3f}</td><td>{verdict}</td></tr>")
    return ('<table class="af-probe"><tr><th>aligner</th><th>caption</th><th>edited</th><th>change</th>'
            f'<th></th></tr>{"".join(rows)}</table>')
