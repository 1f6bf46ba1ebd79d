"""What ``alignfuse serve`` shows, read from a run directory: the one adapter between a run and the page.

A :class:`RunSource` holds, for one run (an ``alignfuse demo`` output or an align / bridge run):

* the test gallery: images uint8 [N, H, W, 3] (regenerated from the run's data section, from the
  dataset cache), their captions (T strings) and ``caption_owner`` int [T] (the image row of each);
* per aligner, the saved test embeddings ``image_emb`` [N, D] and ``text_emb`` [T, D] (L2-normalised);
* per aligner, the trained model when the run can rebuild it (:func:`load_trained_aligner`), used to
  encode new captions and uploaded images live through the frozen encoders (MiniLM, MobileNetV2);
* the trained LLM bridge when the run has one (:func:`load_trained_bridge`).

Whatever a run lacks (no checkpoint: an older version; no bridge) is recorded as a reason that the
page shows, never as an exception at request time. Files read: the run directory (paths built from
names are checked to stay inside it), the toolkit's caches and the data the run's config names;
never a path that comes from a request.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

EMBEDDING_FILES = ("image_emb", "text_emb", "text_to_image")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class Unavailable(Exception):
    """A feature this run cannot offer; ``str(e)`` says why (shown in the page)."""


# ------------------------------------------------------------------------ the two hooks into trained parts


def load_trained_aligner(run_dir: Path, name: str) -> Any:
    """The trained aligner ``name`` of the align run in ``run_dir`` (seed 0), or :class:`Unavailable`."""
    try:
        from experiments.runs import load_aligner
    except ImportError:
        raise Unavailable("this alignfuse version cannot rebuild trained aligners (experiments.runs is "
                          "missing): only the run's test captions and gallery images can be searched") from None
    try:
        return load_aligner(run_dir, name, seed=0)
    except Exception as e:  # noqa: BLE001 - any failure to rebuild (missing file, older format) is a reason shown
        log.debug("cannot rebuild aligner %s from %s", name, run_dir, exc_info=True)
        raise Unavailable(f"{name}: the run has no usable checkpoint (made by an older version?): {e}") from None


def load_trained_bridge(run_dir: Path) -> Any:
    """The trained multimodal LM (``.chat``, caption) of the bridge run in ``run_dir``, or :class:`Unavailable`."""
    try:
        from experiments.ask import load_bridge
    except ImportError:
        raise Unavailable("this alignfuse version cannot load trained bridges (experiments.ask is missing)") from None
    try:
        return load_bridge(run_dir)
    except Exception as e:  # noqa: BLE001 - as above
        log.debug("cannot load the bridge of %s", run_dir, exc_info=True)
        raise Unavailable(f"this run has no usable trained LLM bridge (made by an older version?): {e}") from None


# ------------------------------------------------------------------------ run directory layout


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refusing anything outside ``root`` (symlinks included)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{path} points outside the run directory {root}")
    return resolved


def _read_json(root: Path, path: Path) -> dict[str, Any]:
    path = _inside(root, path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def find_align_dir(run_dir: Path) -> Path | None:
    """The folder holding the align run's ``results.json`` + ``embeddings/`` (the run itself or ``align/``)."""
    for cand in (run_dir, run_dir / "align"):
        if (cand / "results.json").is_file() and (cand / "embeddings").is_dir():
            return _inside(run_dir, cand)
    return None


def find_bridge_dir(run_dir: Path) -> Path | None:
    """The bridge run's folder (``bridge/`` of a demo, or the run itself), if there is one."""
    for cand in (run_dir / "bridge", run_dir):
        if (cand / "results.json").is_file():
            res = _read_json(run_dir, cand / "results.json")
            if "runs" in res or res.get("experiment") == "bridge":
                return _inside(run_dir, cand)
    return None


# ------------------------------------------------------------------------ the source


@dataclass
class Gallery:
    """The test images and captions the run was evaluated on (rows match the saved embeddings)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # T
    caption_owner: np.ndarray  # int [T]: image row of each caption
    hard_negatives: list[list[tuple[str, str, str]]] = field(default_factory=list)  # per image (source, edit, kind)

    def captions_of(self, row: int) -> list[str]:
        return [self.captions[j] for j in np.flatnonzero(self.caption_owner == row)]


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RunSource:
    """One run, ready to search. ``aligners`` (name → trained model) overrides loading them from the run.

    ``background``: rebuild the trained aligners in a thread (the page can be served meanwhile; whatever needs
    them waits for it); ``warm``: then also load the frozen encoders, so that the first live query is fast.
    """

    def __init__(self, run_dir: str | Path, aligners: dict[str, Any] | None = None,
                 aligner_loader: Callable[[Path, str], Any] = load_trained_aligner,
                 bridge_loader: Callable[[Path], Any] = load_trained_bridge, warm: bool = False,
                 background: bool = False) -> None:
        self.run_dir = Path(run_dir).resolve()
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run directory")
        self.align_dir = find_align_dir(self.run_dir)
        self.bridge_dir = find_bridge_dir(self.run_dir)
        if self.align_dir is None and self.bridge_dir is None:
            raise FileNotFoundError(f"{run_dir}: not a demo, align or bridge run (expected results.json and "
                                    "embeddings/ here or in align/, or a bridge run; run `alignfuse demo` first)")
        # the run whose config describes the data: the align run, else the bridge run (no aligners to show)
        self.config_dir = self.align_dir or self.bridge_dir
        self.results = _read_json(self.run_dir, self.config_dir / "results.json")
        if self.align_dir:
            self.data = self.results.get("data")
        else:  # the bridge config's data section is ShapesWorld's options (it has no name)
            bridge_data = (self.results.get("config") or {}).get("data")
            self.data = {"name": "shapesworld", **bridge_data} if isinstance(bridge_data, dict) else None
        if not isinstance(self.data, dict) or "name" not in self.data:
            raise ValueError(f"{self.config_dir / 'results.json'}: no data section (a run from an older version?)")
        self.gallery = self._load_gallery()
        self.problems: dict[str, str] = {}  # aligner → why it is not shown at all
        self.image_emb: dict[str, np.ndarray] = {}
        self.text_emb: dict[str, np.ndarray] = {}
        if self.align_dir is not None:
            self._load_embeddings()
            if not self.image_emb:
                raise ValueError(f"{self.align_dir / 'embeddings'}: no aligner has usable test embeddings "
                                 f"({'; '.join(f'{k}: {v}' for k, v in self.problems.items()) or 'empty folder'})")
        self.names = list(self.image_emb)
        self._caption_index: dict[str, list[int]] = {}
        for j, c in enumerate(self.gallery.captions):
            self._caption_index.setdefault(normalise_text(c), []).append(j)
        self._models: dict[str, Any] = dict(aligners or {})
        self._live_reason: dict[str, str] = {}
        self._loaded = threading.Event()
        self._aligner_loader = aligner_loader
        self._bridge_loader = bridge_loader
        self._bridge_lock = threading.Lock()
        self._bridge: Any = None
        self._bridge_reason: str | None = None
        self._encode_lock = threading.Lock()
        self._text_memo: dict[tuple[str, ...], np.ndarray] = {}
        if background:
            threading.Thread(target=self._load_parts, args=(warm,), daemon=True, name="serve-loader").start()
        else:
            self._load_parts(warm)

    def _load_parts(self, warm: bool) -> None:
        """Rebuild the trained aligners (then, with ``warm``, load and run the frozen encoders once)."""
        try:
            for name in self.names:
                if name not in self._models:
                    try:
                        self._models[name] = self._aligner_loader(self.align_dir, name)
                    except Unavailable as e:
                        self._live_reason[name] = str(e)
        finally:
            self._loaded.set()
        if warm:
            self.warm_up()

    # ----------------------------------------------------------------- loading

    def _run_sections(self) -> tuple[Any, Any, Path]:
        """(data section, encoders section, cache root) of the run: its ``config.json``, or, for runs made before
        configs were saved, the data section in ``results.json`` with the default encoders."""
        from experiments.config import DataSection
        from experiments.views import EncodersSection

        if (self.config_dir / "config.json").is_file():
            cfg = _read_json(self.run_dir, self.config_dir / "config.json")
            data, encoders, cache_dir = cfg.get("data") or self.data, cfg.get("encoders") or {}, cfg.get("cache_dir")
        elif self.align_dir is None:  # a bridge run: its config is inside results.json; its encoders are its own
            data, encoders, cache_dir = self.data, {}, self.results["config"].get("cache_dir")
        else:
            data, encoders, cache_dir = self.data, {}, None
        from align.weights import cache_root

        data = {k: v for k, v in data.items() if k != "inputs"}
        return DataSection(**data), EncodersSection(**encoders), Path(cache_dir) if cache_dir else cache_root()

    def _load_gallery(self) -> Gallery:
        """The run's test images and captions, through the same data layer (``experiments.views``) the run used."""
        from experiments.views import pair_views

        section, self.encoders, cache = self._run_sections()
        views = pair_views(section, self.encoders, cache)
        if views.src.images is None:
            raise ValueError(f"{self.config_dir}: data {section.name!r} (view {self.data.get('view', 'image_text')!r}) "
                             "has no images and captions to show")
        idx = views.split_index("test")
        captions, owner = views.captions("test")
        hard: list[list[tuple[str, str, str]]] = [[] for _ in idx]
        hn = views.hard_negatives("test")
        if hn is not None:
            kinds = getattr(views.src.dataset, "hard_negative_kinds", None)
            seen = np.zeros(len(idx), dtype=int)
            for src_text, neg, row in zip(*hn):
                kind = kinds[idx[row]][seen[row]] if kinds is not None else "edit"
                seen[row] += 1
                hard[row].append((src_text, neg, kind))
        return Gallery(np.ascontiguousarray(views.src.images[idx]), captions, owner, hard)

    def _load_embeddings(self) -> None:
        root = self.align_dir / "embeddings"
        n_img, n_txt = len(self.gallery.images), len(self.gallery.captions)
        order = list(self.results.get("aligners", {})) or sorted(p.name for p in root.iterdir())
        for name in order:
            if not _SAFE_NAME.match(name):
                self.problems[name] = "not a valid aligner name"
                continue
            folder = root / name
            try:
                arrays = {f: np.load(_inside(self.run_dir, folder / f"{f}.npy"), allow_pickle=False)
                          for f in EMBEDDING_FILES}
            except (OSError, ValueError) as e:
                self.problems[name] = f"embeddings unreadable ({e})"
                continue
            img, txt, t2i = arrays["image_emb"], arrays["text_emb"], arrays["text_to_image"]
            if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or len(img) != n_img \
                    or len(txt) != n_txt or not np.array_equal(t2i, self.gallery.caption_owner):
                self.problems[name] = (f"embeddings {img.shape} / {txt.shape} do not match the {n_img} test images "
                                       f"and {n_txt} captions of the run's data section")
                continue
            self.image_emb[name], self.text_emb[name] = _unit(img), _unit(txt)

    @cached_property
    def text_encoder(self):
        """The run's frozen text encoder (``encoders.text`` of its config)."""
        from experiments.features import build_encoder

        return build_encoder(self.encoders.text, **self.encoders.text_options)

    @cached_property
    def image_encoder(self):
        """The run's frozen image encoder (``encoders.image`` of its config)."""
        from experiments.features import build_encoder

        return build_encoder(self.encoders.image, **self.encoders.image_options)

    @cached_property
    def graph_builder(self):
        from align.graphs import TextGraphBuilder

        return TextGraphBuilder()

    def warm_up(self) -> None:
        """Load the frozen encoders (and run them once), so that the first live query is fast."""
        try:
            if any(self.live(n) for n in self.names):
                self.encode_texts(next(n for n in self.names if self.live(n)), ["a red circle"])
                self.encode_images(next(n for n in self.names if self.live(n)), self.gallery.images[:1])
        except Exception:  # noqa: BLE001 - warming is best effort; the request path reports errors
            log.exception("warm-up failed")

    # ----------------------------------------------------------------- what the run offers

    def live(self, name: str) -> bool:
        """True when ``name`` can encode new captions and images (a trained model is loaded)."""
        self._loaded.wait()
        return name in self._models

    def live_reason(self, name: str) -> str | None:
        self._loaded.wait()
        return self._live_reason.get(name)

    def caption_rows(self, text: str) -> list[int]:
        """Rows of the test captions equal to ``text`` (case, spacing and a final full stop ignored)."""
        return self._caption_index.get(normalise_text(text), [])

    @property
    def image_size(self) -> int:
        return int(self.gallery.images.shape[1])

    # ----------------------------------------------------------------- live encoding

    def encode_texts(self, name: str, texts: list[str]) -> np.ndarray:
        """Aligner ``name``'s unit embeddings [n, D] of ``texts``; saved rows for test captions when not live."""
        if not self.live(name):
            rows = [self.caption_rows(t) for t in texts]
            if all(rows):
                return self.text_emb[name][[r[0] for r in rows]]
            raise Unavailable(self._live_reason.get(name, f"{name} cannot encode new text"))
        model = self._models[name]
        kind = _input_kind(model, "text")
        with self._encode_lock:
            if kind == "raw":
                x: Any = list(texts)
            elif kind == "graph":
                x = self.graph_builder.build(texts, progress=False)
            elif kind == "vector":
                x = self._text_features(tuple(texts))
            else:
                raise Unavailable(f"{name}: text input kind {kind!r} cannot be encoded live")
            return _unit(_encode(model, "text", x))

    def _text_features(self, texts: tuple[str, ...]) -> np.ndarray:
        """Frozen text-encoder features [n, d] of ``texts``, shared by every aligner of one request (last 64 kept)."""
        feats = self._text_memo.get(texts)
        if feats is None:
            feats = self.text_encoder.encode(list(texts), kinds=("pooled",))["pooled"]
            if len(self._text_memo) >= 64:
                self._text_memo.pop(next(iter(self._text_memo)))
            self._text_memo[texts] = feats
        return feats

    def encode_images(self, name: str, images: np.ndarray) -> np.ndarray:
        """Aligner ``name``'s unit embeddings [n, D] of uint8 images [n, S, S, 3] (S = the gallery's size)."""
        if not self.live(name):
            raise Unavailable(self._live_reason.get(name, f"{name} cannot encode new images"))
        model = self._models[name]
        kind = _input_kind(model, "image")
        with self._encode_lock:
            if kind == "pixels":
                x: Any = np.asarray(images)
            elif kind in ("vector", "grid"):
                feats = self.image_encoder.encode(np.asarray(images), kinds=("pooled" if kind == "vector" else "grid",))
                x = np.asarray(feats["pooled" if kind == "vector" else "grid"], dtype=np.float32)
            else:
                raise Unavailable(f"{name}: image input kind {kind!r} cannot be encoded live")
            return _unit(_encode(model, "image", x))

    # ----------------------------------------------------------------- bridge

    def bridge_status(self) -> str | None:
        """Why the run has no usable bridge (checked without loading the LLM), or None when it may have one."""
        if self._bridge_reason is not None:
            return self._bridge_reason
        if self.bridge_dir is None:
            return (f"{self.run_dir.name} has no LLM bridge run: run `alignfuse demo` with the bridge part "
                    "(or serve a bridge run) to ask questions about images")
        if self._bridge_loader is load_trained_bridge:
            try:
                from experiments.ask import find_model_dir
            except ImportError:
                return "this alignfuse version cannot load trained bridges (experiments.ask is missing)"
            try:
                find_model_dir(self.bridge_dir)
            except FileNotFoundError as e:
                return f"the bridge run saved no trained model: {e}"
        return None

    def bridge(self) -> Any:
        """The trained multimodal LM (loaded on first use), or :class:`Unavailable` saying why not."""
        with self._bridge_lock:
            if self._bridge is None and self._bridge_reason is None:
                self._bridge_reason = self.bridge_status()
                if self._bridge_reason is None:
                    try:
                        self._bridge = self._bridge_loader(self.bridge_dir)
                    except Unavailable as e:
                        self._bridge_reason = str(e)
            if self._bridge is None:
                raise Unavailable(self._bridge_reason)
            return self._bridge

    # ----------------------------------------------------------------- benchmarks

    def tiled(self, n_images: int) -> "RunSource":
        """A copy whose gallery repeats the test images (and their embeddings) to ``n_images`` rows (benchmarks)."""
        import copy

        out = copy.copy(self)
        reps = -(-n_images // len(self.gallery.images))
        g = self.gallery
        out.gallery = Gallery(_TiledImages(g.images, n_images), g.captions, g.caption_owner, g.hard_negatives)
        rng = np.random.default_rng(0)
        out.image_emb = {k: _unit(np.tile(v, (reps, 1))[:n_images] + 1e-3 * rng.standard_normal(
            (n_images, v.shape[1])).astype(np.float32)) for k, v in self.image_emb.items()}
        return out


class _TiledImages:
    """``images`` [n, H, W, 3] repeated to ``length`` rows without copying: row i is ``images[i % n]``."""

    def __init__(self, images: np.ndarray, length: int) -> None:
        self.images, self.length = images, length
        self.shape = (length, *images.shape[1:])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = np.arange(self.length)[index]
        return self.images[rows % len(self.images)]

    def base_row(self, row: int) -> int:
        return int(row) % len(self.images)


def _input_kind(model: Any, key: str) -> str:
    inputs = getattr(model, "inputs", None) or {"image": "vector", "text": "vector"}
    return inputs.get(key, "vector")


def _encode(model: Any, modality: str, x: Any) -> np.ndarray:
    import torch

    from align.base import encode_in_batches

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return encode_in_batches(model, modality, x, batch_size=256).numpy()
