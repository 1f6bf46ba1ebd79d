"""Classification tasks for the fusion comparison: any labelled multi-modal data → per-kind, per-split views.

A task is one label over two or more modalities (:class:`TaskData`). Tasks come from the data section:

* ``shapesworld``: the bundled benchmark: ``nearest_colour`` (complementary: colour only in RGB, nearness only in
  depth), ``largest_shape`` (redundant, with a noisy caption) and ``digits_halves`` (scikit-learn digits, left and
  right half of each scan);
* ``digits``: ``digits_halves``;
* ``multiview`` or any registered loader returning ``MultiViewData`` (one task named after ``data.name``; any
  modality names, any number): vectors [N, d] give the ``pooled``, ``grid`` and ``raw`` kinds alike; sequences
  [N, C, T] give ``pooled``/``raw`` = the flattened sequence and ``grid`` = T tokens of C channels.

Kinds: ``pooled`` (vectors), ``grid`` (tokens [N, L, d] where available, else vectors), ``raw`` (flattened raw
values, for ``data/concat``), ``pixels`` (uint8 RGB [N, S, S, 3] and depth [N, S, S]; ShapesWorld only). Every
feature is standardised with training statistics (``sklearn.preprocessing.StandardScaler``). Image and text
features come from the frozen encoders named in the config, through the feature cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BUILTIN_TASKS = {"shapesworld": ("nearest_colour", "largest_shape", "digits_halves"), "digits": ("digits_halves",)}
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "nearest_colour": ("image", "depth", "text"),
    "largest_shape": ("image", "depth", "text"),
    "digits_halves": ("left", "right"),
}
DEFAULT_MODALITIES: dict[str, tuple[str, ...]] = {
    "nearest_colour": ("image", "depth"),  # text would leak part of the answer (see the fusion report)
    "largest_shape": ("image", "depth", "text"),
    "digits_halves": ("left", "right"),
}
TASK_KIND = {"nearest_colour": "complementary", "largest_shape": "redundant, noisy caption",
             "digits_halves": "two views"}


def known_tasks(data_name: str) -> tuple[str, ...]:
    """Task names a data section offers (a multi-view dataset is one task named after it)."""
    return BUILTIN_TASKS.get(data_name, (data_name,))


@dataclass
class TaskData:
    """Everything one task needs, per input kind.

    ``views[kind][split][modality]``: arrays with one row per sample of the split; kinds ``pooled``
    (vectors), ``grid`` (tokens [N, L, d] where available, else vectors), ``raw`` (data/concat vectors),
    ``pixels`` (uint8 images [N, S, S, 3] and depth [N, S, S]; ShapesWorld only). ``noise_scale[kind][m]``:
    the std of the Gaussian test noise at ``noise_std=1`` (1 for standardised features; per-channel
    pixel std for pixels). ``labels[split]``: int64 [N].
    """

    name: str
    modalities: tuple[str, ...]
    class_names: list[str]
    labels: dict[str, np.ndarray]
    views: dict[str, dict[str, dict[str, np.ndarray]]]
    noise_scale: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def standardise(split_arrays: dict[str, np.ndarray], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Per-feature (last axis) standardisation with the train split's statistics (``StandardScaler``; constant
    features keep scale 1)."""
    from sklearn.preprocessing import StandardScaler

    train = np.asarray(split_arrays["train"], dtype=np.float32)
    d = train.shape[-1]
    scaler = StandardScaler().fit(train.reshape(-1, d))
    out = {}
    for s, a in split_arrays.items():
        a = np.asarray(a, dtype=np.float32)
        out[s] = scaler.transform(a.reshape(-1, d)).reshape(a.shape).astype(dtype)
    return out


def _downsample(x: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """Area downsampling of uint8 [N, H, W(, C)] to [N, size, size(, C)]."""
    import torch.nn.functional as F

    out = []
    for i in range(0, len(x), chunk):
        t = torch.from_numpy(np.asarray(x[i:i + chunk])).float()
        t = t.unsqueeze(-1) if t.dim() == 3 else t
        t = F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
        t = t.round().clamp(0, 255).to(torch.uint8)
        out.append(t.squeeze(-1) if x.ndim == 3 else t)
    return torch.cat(out).numpy()


def _shapesworld_tasks(ds: Any, modalities: dict[str, Sequence[str]], kinds: set[str], encoders: Any,
                       cache: Any, cnn_pixels: int, flat_pixels: int) -> dict[str, TaskData]:
    """Frozen features (from the cache when present) of a loaded ShapesWorld and the views of the ``modalities``
    tasks."""
    from experiments.data.shapesworld import COLOUR_WORDS
    from experiments.features import build_encoder, extract_features

    c = ds.config
    tasks = list(modalities)
    used = {m for t in tasks for m in modalities[t]}
    idx = {s: ds.splits[s] for s in SPLITS}
    if any(len(idx[s]) == 0 for s in SPLITS):
        raise ValueError(f"ShapesWorld with n_scenes={c.n_scenes} has an empty split: "
                         f"{ {s: len(i) for s, i in idx.items()} }; use more scenes")

    per_mod: dict[str, dict[str, dict[str, np.ndarray]]] = {k: {} for k in ("pooled", "grid", "raw", "pixels")}
    noise: dict[str, dict[str, Any]] = {k: {} for k in per_mod}
    encoder_ms: dict[str, float] = {}
    vision_kinds = ("pooled", "grid") if "grid" in kinds else ("pooled",)
    if used & {"image", "depth"}:
        vision = build_encoder(encoders.image, **encoders.image_options)
        for m in ("image", "depth"):
            if m not in used:
                continue
            if m == "image":
                inputs, key = np.asarray(ds.images), ds.fingerprint
            else:  # an RGB network on a grey image: the depth map replicated to 3 channels
                inputs, key = np.repeat(np.asarray(ds.depth)[..., None], 3, axis=-1), f"{ds.fingerprint}-depth3ch"
            log.info("%s features: frozen %s%s", m, vision.name, " on depth replicated to 3 channels" * (m == "depth"))
            feats = extract_features(inputs, vision, cache, key, split="all", kinds=vision_kinds)
            for k in vision_kinds:
                per_mod[k][m] = standardise({s: feats[k][idx[s]] for s in SPLITS},
                                             dtype=np.float16 if k == "grid" else np.float32)
                noise[k][m] = 1.0
            del inputs
        encoder_ms["image"] = encoder_ms["depth"] = _time_encoder(vision, np.asarray(ds.images[:8]))
    if "text" in used:
        text_enc = build_encoder(encoders.text, **encoders.text_options)
        feats = extract_features(list(ds.noisy_captions), text_enc, cache, f"{ds.fingerprint}-noisy_captions",
                                 split="all", kinds=("pooled",))
        per_mod["pooled"]["text"] = per_mod["grid"]["text"] = standardise(
            {s: feats["pooled"][idx[s]] for s in SPLITS})
        noise["pooled"]["text"] = noise["grid"]["text"] = 1.0
        encoder_ms["text"] = _time_encoder(text_enc, list(ds.noisy_captions[:8]))

    if "pixels" in kinds:
        for m, src in (("image", ds.images), ("depth", ds.depth)):
            if m in used:
                small = _downsample(np.asarray(src), cnn_pixels)
                per_mod["pixels"][m] = {s: small[idx[s]] for s in SPLITS}
                train = per_mod["pixels"][m]["train"].astype(np.float32)
                noise["pixels"][m] = train.reshape(-1, 3).std(0) if m == "image" else float(train.std())
    if "raw" in kinds:
        for m, src in (("image", ds.images), ("depth", ds.depth)):
            if m in used:
                flat = _downsample(np.asarray(src), flat_pixels).reshape(len(ds), -1)
                per_mod["raw"][m] = standardise({s: flat[idx[s]] for s in SPLITS})
                noise["raw"][m] = 1.0
        if "text" in used:
            from sklearn.feature_extraction.text import CountVectorizer

            texts = np.asarray(ds.noisy_captions, dtype=object)
            bow = CountVectorizer(binary=True).fit(texts[idx["train"]])
            per_mod["raw"]["text"] = standardise({s: bow.transform(texts[idx[s]]).toarray() for s in SPLITS})
            noise["raw"]["text"] = 1.0

    out = {}
    for task in tasks:
        mods = tuple(modalities[task])
        views = {k: {s: {m: per_mod[k][m][s] for m in mods if m in per_mod[k]} for s in SPLITS}
                 for k in per_mod if k in kinds and per_mod[k]}
        labels = {s: np.asarray(ds.labels[task][idx[s]], dtype=np.int64) for s in SPLITS}
        info: dict[str, Any] = {
            "dataset": f"ShapesWorld ({c.n_scenes} scenes, {c.image_size} px, seed {c.seed}, "
                       f"caption_noise {c.caption_noise})",
            "kind": TASK_KIND[task], "modalities": list(mods), "fingerprint": ds.fingerprint,
            "n": {s: int(len(idx[s])) for s in SPLITS},
            "encoder_latency_ms": {m: encoder_ms[m] for m in mods if m in encoder_ms},
        }
        if task == "nearest_colour":
            test = idx["test"]
            named = [any(w in ds.noisy_captions[i].split() for w in
                         COLOUR_WORDS[ds.scenes[i]["objects"][ds.scenes[i]["nearest"]]["colour"]]) for i in test]
            info["caption_names_nearest_colour"] = 100.0 * float(np.mean(named))
            info["one_object_scenes"] = 100.0 * float(np.mean([len(ds.scenes[i]["objects"]) == 1 for i in test]))
        if task == "largest_shape" and "text" in mods:
            info["caption_shape_wrong"] = 100.0 * float(np.mean(ds.noisy_corrupted[idx["test"]]))
        out[task] = TaskData(task, mods, list(ds.class_names[task]), labels, views,
                             {k: {m: noise[k][m] for m in mods if m in noise[k]} for k in noise}, info)
    return out


def _time_encoder(encoder: Any, inputs: Any) -> float:
    """Frozen-encoder latency, ms per sample at batch 1 (median of ``len(inputs)`` calls after a warm-up)."""
    encoder.encode(inputs[:1])
    times = []
    for i in range(len(inputs)):
        t0 = time.perf_counter()
        encoder.encode(inputs[i:i + 1])
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _digits_task(ds: Any, mods: Sequence[str]) -> TaskData:
    mods = tuple(mods)
    idx = {s: ds.splits[s] for s in SPLITS}
    std = {m: standardise({s: ds.views[m][idx[s]] for s in SPLITS}) for m in mods}
    views = {k: {s: {m: std[m][s] for m in mods} for s in SPLITS} for k in ("pooled", "grid", "raw")}
    return TaskData(
        "digits_halves", mods, list(ds.class_names["digit"]),
        {s: np.asarray(ds.labels["digit"][idx[s]], dtype=np.int64) for s in SPLITS}, views,
        {k: {m: 1.0 for m in mods} for k in views},
        {"dataset": f"scikit-learn digits ({len(ds)} scans, split seed {ds.config.seed})", "kind": TASK_KIND[
            "digits_halves"], "modalities": list(mods), "n": {s: int(len(idx[s])) for s in SPLITS},
         "fingerprint": ds.fingerprint,
         "encoder_latency_ms": {}},
    )




def _multiview_task(data: Any, name: str, mods: Sequence[str]) -> TaskData:
    """One task over the views ``mods`` of a ``MultiViewData``."""
    mods = tuple(mods)
    idx = {s: data.splits[s] for s in SPLITS}
    empty = [s for s in SPLITS if len(idx[s]) == 0]
    if empty:
        raise ValueError(f"{name}: split(s) {', '.join(empty)} are empty ({ {s: len(i) for s, i in idx.items()} })")
    views: dict[str, dict[str, dict[str, np.ndarray]]] = {k: {s: {} for s in SPLITS} for k in ("pooled", "grid", "raw")}
    shapes = {}
    for m in mods:
        x = np.asarray(data.views[m], dtype=np.float32)
        shapes[m] = list(x.shape[1:])
        flat = standardise({s: x[idx[s]].reshape(len(idx[s]), -1) for s in SPLITS})
        tokens = standardise({s: np.swapaxes(x[idx[s]], 1, 2) for s in SPLITS}) if x.ndim == 3 else flat
        for s in SPLITS:
            views["pooled"][s][m] = views["raw"][s][m] = flat[s]
            views["grid"][s][m] = tokens[s]
    labels = {s: np.asarray(data.labels[idx[s]], dtype=np.int64) for s in SPLITS}
    info = {"dataset": f"{name} ({len(data.labels)} samples; views " + ", ".join(f"{m} {shapes[m]}" for m in mods)
                       + ")",
            "kind": "multi-view", "modalities": list(mods), "n": {s: int(len(idx[s])) for s in SPLITS},
            "fingerprint": data.fingerprint,
            "encoder_latency_ms": {}}
    return TaskData(name, mods, list(data.class_names), labels, views, {k: {m: 1.0 for m in mods} for k in views}, info)


def build_tasks(section: Any, modalities: dict[str, Sequence[str]], kinds: set[str], encoders: Any,
                cache_root: Path) -> dict[str, TaskData]:
    """The tasks named in ``modalities`` (task → modalities) of data ``section``, with the view ``kinds`` needed."""
    from experiments.data import DigitsData, MultiViewData, load_digits
    from experiments.features import FeatureCache
    from experiments.views import load_data

    opts = section.options()
    out: dict[str, TaskData] = {}
    if section.name in BUILTIN_TASKS:
        sw = {t: m for t, m in modalities.items() if t in ("nearest_colour", "largest_shape")}
        if sw:
            ds = load_data(section, cache_root)
            out.update(_shapesworld_tasks(ds, sw, kinds, encoders, FeatureCache(cache_root / "features"),
                                          int(opts.get("cnn_pixels", 64)), int(opts.get("flat_pixels", 16))))
        if "digits_halves" in modalities:
            ds = load_data(section, cache_root) if section.name == "digits" else load_digits(seed=opts.get("seed", 0))
            out["digits_halves"] = _digits_task(ds, modalities["digits_halves"])
        return {t: out[t] for t in modalities}
    data = load_data(section, cache_root)
    if isinstance(data, DigitsData):
        return {t: _digits_task(data, m) for t, m in modalities.items()}
    if not isinstance(data, MultiViewData):
        raise ValueError(f"data {section.name!r} gives a {type(data).__name__}; the fusion runner needs labelled "
                         "multi-view data (MultiViewData), shapesworld or digits")
    for t, mods in modalities.items():
        unknown = [m for m in (mods or data.modalities) if m not in data.views]
        if unknown:
            raise ValueError(f"modalities.{t}: {unknown} are not views of {section.name}; views: {data.modalities}")
        out[t] = _multiview_task(data, t, mods or data.modalities)
    return out
