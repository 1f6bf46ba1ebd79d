"""Fusion at three levels, compared fairly: accuracy, robustness to missing or noisy modalities, cost.

``alignfuse run fusion_shapesworld [key=value ...]`` (or ``run(load(raw, where))``) trains and evaluates
every configured strategy on every task over several seeds and writes ``results.json``,
``report_fusion.md`` and ``fusion_robustness_<task>*.png`` into ``out_dir``.

Tasks
-----
* ``nearest_colour`` (ShapesWorld, *complementary*): the colour of the object nearest the camera. Colour is
  only in the RGB image, nearness only in the depth map, so one modality alone cannot solve it (except in
  one-object scenes). Default modalities: image + depth. The noisy caption is *not* used by default: it names
  the largest object's colour half of the time, and the largest object is the nearest one in about half of the
  scenes (always in one-object scenes), so text would leak part of the answer; the report gives the measured
  leak rate (``task_info[...]["caption_names_nearest_colour"]``).
* ``largest_shape`` (ShapesWorld, *redundant* and noisy): the shape of the largest object, readable from the
  image, from the depth silhouettes and from the noisy caption (whose shape word is wrong with probability
  ``data.caption_noise``). Default modalities: image + depth + text.
* ``digits_halves`` (scikit-learn digits, two views): the digit (10 classes) from the left and right halves
  of the 8x8 scan (32 values each).

Inputs per level (all standardised with training-set statistics)
------------------------------------------------------------------
* image: frozen ImageNet MobileNetV2 at ``data.image_size`` px, ``pooled`` [1280] or ``grid`` [16, 1280];
  depth: the same network on the depth map replicated to 3 channels (an RGB network seeing a grey image);
  text: frozen MiniLM (all-MiniLM-L6-v2) sentence embedding [384] of the noisy caption.
* feature level: ``pooled`` vectors, except the strategies in ``grid_tokens`` (default
  ``feature/cross_attention``), which get the 4x4 grid tokens and can bind "where" across modalities. The other
  feature-level operators would average the tokens anyway (``fusion.FeatureFusion``), so they get the pooled
  vector: the spatial binding is lost before they fuse.
* decision level (``decision/*``): one scikit-learn ``LogisticRegression`` per modality on the ``pooled``
  vectors, combined by the rule; closed-form, so fitted with ``fit`` (not through the gradient Trainer).
* data level: ``data/channel_stack`` gets raw RGB + depth pixels area-downsampled to ``data.cnn_pixels`` px
  (a small CNN from scratch); ``data/concat`` gets raw pixels area-downsampled to ``data.flat_pixels`` px and
  flattened, plus the caption as binary bag of words when text is a modality. Digits: the raw halves.
* ``unimodal/<modality>``: one model per modality with the feature-level encoder + head
  (``MLP(d → hidden → embed_dim)`` then ``MLP(embed_dim → hidden → C)``) on the ``pooled`` vector.

Protocol
--------
Every gradient model (data level, feature level, unimodal) trains through the shared
:class:`experiments.trainer.Trainer` with the same ``train`` budget, once per seed (the seed sets the
initialisation and the batch order). Decision-level classifiers are deterministic (lbfgs): the seed only
shuffles the cross-validation folds of ``weighted`` and ``stacking``, and ``mean``/``vote`` are fitted once
(then evaluated under each seed's test corruptions). The test split is used only for the reported numbers;
the validation split gives ``val_accuracy`` and picks the reference strategy of the paired t-tests.

Robustness: at test time a fraction ``rate`` of the test samples loses one modality (``"<m>_mask"`` False;
the strategies' own missing-modality mechanism) or gets Gaussian noise of std ``robustness.noise_std`` times
the training std of each input feature (for pixels: of each channel, in pixel units, clipped to [0, 255]).
The corrupted samples are the same for every strategy (nested across rates). ``missing_modality[m]`` is the
accuracy with ``m`` absent from the inputs for the whole test set. All accuracies are in percent.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fusion
from experiments.config import ConfigError, check_kwargs, from_dict
from experiments.trainer import TrainConfig
from fusion._common import FusionModule, batch_size, mlp, presence, zero_missing_rows

log = logging.getLogger(__name__)

__all__ = [
    "Config", "DataConfig", "RobustnessConfig", "TaskData", "UnimodalClassifier",
    "format_results", "load", "run", "to_dict", "validate",
]

TASKS: tuple[str, ...] = ("nearest_colour", "largest_shape", "digits_halves")
SHAPESWORLD_TASKS = ("nearest_colour", "largest_shape")
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "nearest_colour": ("image", "depth", "text"),
    "largest_shape": ("image", "depth", "text"),
    "digits_halves": ("left", "right"),
}
TASK_KIND = {"nearest_colour": "complementary", "largest_shape": "redundant, noisy caption",
             "digits_halves": "two views"}
UNIMODAL = "unimodal"
SPLITS = ("train", "val", "test")
CORRUPTIONS = ("drop", "noise")
ESTIMATOR_KWARGS = ("estimator", "final_estimator")  # decision-level kwargs given as LogisticRegression kwargs
IGNORED_PP = 2.0  # a strategy losing less than this when a modality is missing is reported as not using it


# --------------------------------------------------------------------------------------------- config


def _default_modalities() -> dict[str, list[str]]:
    return {"nearest_colour": ["image", "depth"], "largest_shape": ["image", "depth", "text"],
            "digits_halves": ["left", "right"]}


def _default_strategies() -> dict[str, dict[str, Any]]:
    return {
        UNIMODAL: {"embed_dim": 64, "hidden": 128},
        "data/channel_stack": {"backbone": "small", "width": 16},
        "data/concat": {"hidden": 128},
        "feature/concat": {"embed_dim": 64, "hidden": 128},
        "feature/sum": {"embed_dim": 64, "hidden": 128},
        "feature/gated": {"embed_dim": 64, "hidden": 128},
        "feature/tfn": {"embed_dim": 8, "hidden": 128},
        "feature/lmf": {"embed_dim": 32, "hidden": 128, "rank": 4},
        "feature/cross_attention": {"embed_dim": 64, "hidden": 64, "num_heads": 4, "num_layers": 2},
        "decision/mean": {},
        "decision/weighted": {"cv": 3},
        "decision/vote": {},
        "decision/stacking": {"cv": 3},
    }


def _default_train() -> TrainConfig:
    return TrainConfig(max_steps=300, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=20,
                       grad_clip=1.0, monitor="accuracy", mode="max", progress=False, log_every=50)


@dataclass
class DataConfig:
    """Dataset options. ShapesWorld: ``n_scenes``, ``image_size``, ``seed``, ``caption_noise``; raw-pixel
    sizes of the data-level strategies: ``cnn_pixels`` (``data/channel_stack``), ``flat_pixels``
    (``data/concat``, flattened); ``cache_dir``: root of the dataset and feature caches (default
    ``align.weights.cache_root()``)."""

    n_scenes: int = 3000
    image_size: int = 128
    seed: int = 0
    caption_noise: float = 0.25
    cnn_pixels: int = 64
    flat_pixels: int = 16
    cache_dir: str | None = None


@dataclass
class RobustnessConfig:
    """Test-time corruption: fractions ``rates`` of the test samples lose one modality or get Gaussian
    noise of std ``noise_std`` × the training std of each input feature (pixel channel)."""

    rates: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    noise_std: float = 1.0


@dataclass
class Config:
    """The fusion experiment (see the module docstring).

    ``strategies``: ``<level>/<operator>`` (a ``fusion.FUSIONS`` name) → constructor kwargs (``in_dims`` and
    ``num_classes`` are set by the runner), plus ``unimodal`` → kwargs of :class:`UnimodalClassifier` (one
    baseline per modality). Decision-level ``estimator``/``final_estimator`` are given as
    ``LogisticRegression`` kwargs; an int ``cv`` is a shuffled ``StratifiedKFold`` seeded by the run's seed.
    ``modalities``: task → the modalities it uses. ``grid_tokens``: feature-level strategies fed grid tokens.
    ``latency_samples``: single-sample forward passes timed for ``latency_ms``. ``num_threads``: torch
    intra-op threads and BLAS threads (``threadpoolctl``) during the run (restored after; ``None`` leaves
    the defaults). One thread is the default because these models are small: on a shared 2-core machine, two
    OpenMP threads made a training step 10-50x slower than one (spin-waiting under oversubscription).
    """

    experiment: str = "fusion"
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    modalities: dict[str, list[str]] = field(default_factory=_default_modalities)
    strategies: dict[str, dict[str, Any]] = field(default_factory=_default_strategies)
    grid_tokens: list[str] = field(default_factory=lambda: ["feature/cross_attention"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainConfig = field(default_factory=_default_train)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    latency_samples: int = 20
    num_threads: int | None = 1
    out_dir: str = "runs/fusion_shapesworld"


def load(raw: Mapping[str, Any], where: str = "config") -> Config:
    """Build and validate a :class:`Config` from a parsed YAML dict; fails (``ConfigError``) before any work.

    ``train`` keys not given keep this runner's defaults (not ``TrainConfig``'s); tasks missing from
    ``modalities`` keep their default modalities."""
    raw = copy.deepcopy(dict(raw))
    train = raw.get("train")
    if train is None or isinstance(train, Mapping):
        raw["train"] = {**_default_train().to_dict(), **(train or {})}
    if isinstance(raw.get("modalities"), Mapping):
        raw["modalities"] = {**_default_modalities(), **raw["modalities"]}
    cfg = from_dict(Config, raw, where)
    validate(cfg, where)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON types."""
    d = dataclasses.asdict(cfg)
    d["train"] = cfg.train.to_dict()
    return d


def _strategy_factory(name: str):
    return UnimodalClassifier if name == UNIMODAL else fusion.FUSIONS.get(name)


def _level(name: str) -> str:
    return name.split("/", 1)[0]


def validate(cfg: Config, where: str = "config") -> None:
    """Check every name, key and value of ``cfg``; raise :class:`ConfigError` naming the key at fault."""
    from sklearn.linear_model import LogisticRegression

    from experiments.data.shapesworld import ShapesWorldConfig

    if cfg.experiment != "fusion":
        raise ConfigError(f"{where}.experiment is {cfg.experiment!r}; this runner is 'fusion'")
    if not cfg.tasks:
        raise ConfigError(f"{where}.tasks is empty; valid tasks: {', '.join(TASKS)}")
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"{where}.tasks has unknown or repeated tasks {bad or cfg.tasks}; valid tasks: "
                          f"{', '.join(TASKS)}")
    if not isinstance(cfg.modalities, Mapping):
        raise ConfigError(f"{where}.modalities must map task → list of modalities, got {cfg.modalities!r}")
    unknown = sorted(set(cfg.modalities) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown} in {where}.modalities; valid tasks: {', '.join(TASKS)}")
    for task in cfg.tasks:
        mods = cfg.modalities.get(task)
        if mods is None:
            raise ConfigError(f"{where}.modalities has no entry for task {task!r}; "
                              f"its modalities are among {list(TASK_MODALITIES[task])}")
        bad = [m for m in mods if m not in TASK_MODALITIES[task]]
        if bad or len(set(mods)) != len(mods) or len(mods) < 2:
            raise ConfigError(f"{where}.modalities.{task} = {mods}: give at least two distinct modalities among "
                              f"{list(TASK_MODALITIES[task])}")

    if not isinstance(cfg.strategies, Mapping) or not cfg.strategies:
        raise ConfigError(f"{where}.strategies must be a non-empty mapping name → kwargs; valid names: "
                          f"{UNIMODAL}, {', '.join(fusion.FUSIONS.names())}")
    for name, kwargs in cfg.strategies.items():
        key = f"{where}.strategies.{name}"
        if name != UNIMODAL and name not in fusion.FUSIONS:
            raise ConfigError(f"unknown strategy {name!r} in {where}.strategies; valid names: {UNIMODAL}, "
                              f"{', '.join(fusion.FUSIONS.names())}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ConfigError(f"{key} must be a mapping of constructor kwargs (or null), got {kwargs!r}")
        kwargs = dict(kwargs or {})
        skip = ("modality", "in_dim", "num_classes") if name == UNIMODAL else ("in_dims", "num_classes")
        check_kwargs(_strategy_factory(name), kwargs, key, skip=skip)
        if _level(name) == "decision":
            for k in ESTIMATOR_KWARGS:
                if kwargs.get(k) is not None:
                    if not isinstance(kwargs[k], Mapping):
                        raise ConfigError(f"{key}.{k} must be a mapping of LogisticRegression kwargs, "
                                          f"got {kwargs[k]!r}")
                    check_kwargs(LogisticRegression, dict(kwargs[k]), f"{key}.{k}")
            cv = kwargs.get("cv")
            if cv is not None and (isinstance(cv, bool) or not isinstance(cv, int) or cv < 2):
                raise ConfigError(f"{key}.cv must be an int >= 2 (number of shuffled stratified folds), got {cv!r}")
    for name in cfg.grid_tokens:
        if name not in fusion.FUSIONS or _level(name) != "feature":
            feats = [n for n in fusion.FUSIONS.names() if _level(n) == "feature"]
            raise ConfigError(f"{where}.grid_tokens: {name!r} is not a feature-level strategy; valid: "
                              f"{', '.join(feats)}")

    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in cfg.seeds):
        raise ConfigError(f"{where}.seeds must be a non-empty list of distinct non-negative ints, got {cfg.seeds}")
    rates = cfg.robustness.rates
    if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1 for r in rates):
        raise ConfigError(f"{where}.robustness.rates must be a non-empty list of fractions in [0, 1], got {rates}")
    if not isinstance(cfg.robustness.noise_std, (int, float)) or cfg.robustness.noise_std < 0:
        raise ConfigError(f"{where}.robustness.noise_std must be >= 0, got {cfg.robustness.noise_std!r}")
    if cfg.train.out_dir is not None:
        raise ConfigError(f"{where}.train.out_dir must be null: this runner trains many models and keeps no "
                          "checkpoints (results go to out_dir)")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise ConfigError(f"{where}.num_threads must be >= 1 or null, got {cfg.num_threads}")
    if cfg.latency_samples < 1:
        raise ConfigError(f"{where}.latency_samples must be >= 1, got {cfg.latency_samples}")
    d = cfg.data
    if any(t in SHAPESWORLD_TASKS for t in cfg.tasks):
        try:
            ShapesWorldConfig(n_scenes=d.n_scenes, image_size=d.image_size, seed=d.seed,
                              caption_noise=d.caption_noise)
        except ValueError as e:
            raise ConfigError(f"{where}.data: {e}") from None
        for name in ("cnn_pixels", "flat_pixels"):
            value = getattr(d, name)
            if not 8 <= value <= d.image_size:
                raise ConfigError(f"{where}.data.{name} must be in [8, data.image_size={d.image_size}], got {value}")
    if not str(cfg.out_dir):
        raise ConfigError(f"{where}.out_dir must be a directory path")


# --------------------------------------------------------------------------------------------- models


class UnimodalClassifier(FusionModule):
    """The unimodal baseline: the feature-level encoder and head on one modality.

    ``MLP(in_dim → hidden → embed_dim)`` → ``MLP(embed_dim → hidden → num_classes)``. Input
    ``inputs[modality]`` [B, in_dim] (or tokens [B, L, in_dim], averaged). Missing (key absent or
    ``"<modality>_mask"`` False): the input row is zero (the training mean of standardised features), as
    for the data-level strategies. No fusion, so ``fusion_parameters()`` is empty. Name ``unimodal/<modality>``.
    """

    level = UNIMODAL

    def __init__(self, modality: str, in_dim: int, num_classes: int, embed_dim: int = 64, hidden: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 2:
            raise ValueError(f"in_dim must be >= 1 and num_classes >= 2; got {in_dim}, {num_classes}")
        self.modalities = (modality,)
        self.operator = modality
        self.in_dim, self.num_classes = in_dim, num_classes
        self.encoders = nn.ModuleDict({modality: mlp(in_dim, hidden, embed_dim, dropout)})
        self.head = mlp(embed_dim, hidden, num_classes, dropout)

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Logits [B, num_classes]."""
        (m,) = self.modalities
        n = batch_size(inputs, self.modalities)
        device, dtype = self._device(inputs), self._param_dtype()
        if inputs.get(m) is None:
            x = torch.zeros(n, self.in_dim, device=device, dtype=dtype)
        else:
            x = torch.as_tensor(inputs[m], device=device).to(dtype)
            if x.dim() == 3:
                x = x.mean(dim=1)
            if x.dim() != 2 or x.shape[1] != self.in_dim:
                raise ValueError(f"inputs[{m!r}] has shape {tuple(x.shape)}; expected [B, {self.in_dim}]")
            x = zero_missing_rows(x, presence(inputs, m, n, device))
        return self.head(self.encoders[m](x))

    def fusion_parameters(self) -> list[nn.Parameter]:
        return []


# --------------------------------------------------------------------------------------------- data


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


def _standardise(split_arrays: dict[str, np.ndarray], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Per-feature (last axis) standardisation with training statistics; constant features get std 1."""
    train = np.asarray(split_arrays["train"], dtype=np.float32)
    axes = tuple(range(train.ndim - 1))
    mean = train.mean(axis=axes, dtype=np.float64).astype(np.float32)
    std = train.std(axis=axes, dtype=np.float64).astype(np.float32)
    std[std < 1e-6] = 1.0
    return {s: ((np.asarray(a, dtype=np.float32) - mean) / std).astype(dtype) for s, a in split_arrays.items()}


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


def _needed_kinds(cfg: Config) -> set[str]:
    kinds = {"pooled"}
    for name in cfg.strategies:
        kinds.add(_input_kind(name, cfg))
    return kinds


def _input_kind(name: str, cfg: Config) -> str:
    """Which view a strategy is fed."""
    if name == "data/channel_stack":
        return "pixels"
    if name == "data/concat":
        return "raw"
    if name in cfg.grid_tokens:
        return "grid"
    return "pooled"


def _shapesworld_tasks(cfg: Config, tasks: Sequence[str]) -> dict[str, TaskData]:
    """Load ShapesWorld, extract (or read cached) frozen features and build the views of ``tasks``."""
    from align.weights import cache_root
    from experiments.data import load_shapesworld
    from experiments.data.shapesworld import COLOUR_WORDS
    from experiments.features import FeatureCache, build_encoder, extract_features

    d = cfg.data
    root = Path(d.cache_dir) if d.cache_dir else cache_root()
    ds = load_shapesworld(n_scenes=d.n_scenes, image_size=d.image_size, seed=d.seed, caption_noise=d.caption_noise,
                          cache_dir=root / "datasets")
    cache = FeatureCache(root / "features")
    kinds = _needed_kinds(cfg)
    used = {m for t in tasks for m in cfg.modalities[t]}
    idx = {s: ds.splits[s] for s in SPLITS}
    if any(len(idx[s]) == 0 for s in SPLITS):
        raise ValueError(f"ShapesWorld with n_scenes={d.n_scenes} has an empty split: "
                         f"{ {s: len(i) for s, i in idx.items()} }; use more scenes")

    per_mod: dict[str, dict[str, dict[str, np.ndarray]]] = {k: {} for k in ("pooled", "grid", "raw", "pixels")}
    noise: dict[str, dict[str, Any]] = {k: {} for k in per_mod}
    encoder_ms: dict[str, float] = {}
    vision_kinds = ("pooled", "grid") if "grid" in kinds else ("pooled",)
    if used & {"image", "depth"}:
        vision = build_encoder("mobilenet_v2")
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
                per_mod[k][m] = _standardise({s: feats[k][idx[s]] for s in SPLITS},
                                             dtype=np.float16 if k == "grid" else np.float32)
                noise[k][m] = 1.0
            del inputs
        encoder_ms["image"] = encoder_ms["depth"] = _time_encoder(vision, np.asarray(ds.images[:8]))
    if "text" in used:
        text_enc = build_encoder("minilm")
        feats = extract_features(list(ds.noisy_captions), text_enc, cache, f"{ds.fingerprint}-noisy_captions",
                                 split="all", kinds=("pooled",))
        per_mod["pooled"]["text"] = per_mod["grid"]["text"] = _standardise(
            {s: feats["pooled"][idx[s]] for s in SPLITS})
        noise["pooled"]["text"] = noise["grid"]["text"] = 1.0
        encoder_ms["text"] = _time_encoder(text_enc, list(ds.noisy_captions[:8]))

    if "pixels" in kinds:
        for m, src in (("image", ds.images), ("depth", ds.depth)):
            if m in used:
                small = _downsample(np.asarray(src), d.cnn_pixels)
                per_mod["pixels"][m] = {s: small[idx[s]] for s in SPLITS}
                train = per_mod["pixels"][m]["train"].astype(np.float32)
                noise["pixels"][m] = train.reshape(-1, 3).std(0) if m == "image" else float(train.std())
    if "raw" in kinds:
        for m, src in (("image", ds.images), ("depth", ds.depth)):
            if m in used:
                flat = _downsample(np.asarray(src), d.flat_pixels).reshape(len(ds), -1)
                per_mod["raw"][m] = _standardise({s: flat[idx[s]] for s in SPLITS})
                noise["raw"][m] = 1.0
        if "text" in used:
            from sklearn.feature_extraction.text import CountVectorizer

            texts = np.asarray(ds.noisy_captions, dtype=object)
            bow = CountVectorizer(binary=True).fit(texts[idx["train"]])
            per_mod["raw"]["text"] = _standardise({s: bow.transform(texts[idx[s]]).toarray() for s in SPLITS})
            noise["raw"]["text"] = 1.0

    out = {}
    for task in tasks:
        mods = tuple(cfg.modalities[task])
        views = {k: {s: {m: per_mod[k][m][s] for m in mods if m in per_mod[k]} for s in SPLITS}
                 for k in per_mod if k in kinds and per_mod[k]}
        labels = {s: np.asarray(ds.labels[task][idx[s]], dtype=np.int64) for s in SPLITS}
        info: dict[str, Any] = {
            "dataset": f"ShapesWorld ({d.n_scenes} scenes, {d.image_size} px, seed {d.seed}, "
                       f"caption_noise {d.caption_noise})",
            "kind": TASK_KIND[task], "modalities": list(mods),
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


def _digits_task(cfg: Config) -> TaskData:
    from experiments.data import load_digits

    ds = load_digits(seed=cfg.data.seed)
    mods = tuple(cfg.modalities["digits_halves"])
    idx = {s: ds.splits[s] for s in SPLITS}
    std = {m: _standardise({s: ds.views[m][idx[s]] for s in SPLITS}) for m in mods}
    views = {k: {s: {m: std[m][s] for m in mods} for s in SPLITS} for k in ("pooled", "grid", "raw")}
    return TaskData(
        "digits_halves", mods, list(ds.class_names["digit"]),
        {s: np.asarray(ds.labels["digit"][idx[s]], dtype=np.int64) for s in SPLITS}, views,
        {k: {m: 1.0 for m in mods} for k in views},
        {"dataset": f"scikit-learn digits ({len(ds)} scans, split seed {cfg.data.seed})", "kind": TASK_KIND[
            "digits_halves"], "modalities": list(mods), "n": {s: int(len(idx[s])) for s in SPLITS},
         "encoder_latency_ms": {}},
    )


# --------------------------------------------------------------------------------------------- one fit


def _applicable(name: str, task: TaskData) -> str | None:
    """Why ``name`` cannot run on ``task`` (None when it can)."""
    if name == "data/channel_stack" and not {"image", "depth"} <= set(task.modalities):
        return "needs RGB image and depth pixels"
    return None


def _build(name: str, kwargs: Mapping[str, Any], task: TaskData, kind: str, seed: int,
           modality: str | None = None) -> Any:
    """A fresh model for one fit; the torch RNG is seeded first so initialisations differ only by seed."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    torch.manual_seed(seed)
    kwargs = dict(kwargs or {})
    train = task.views[kind]["train"]
    if name == UNIMODAL:
        x = train[modality]
        return UnimodalClassifier(modality, int(x.shape[-1]), task.num_classes, **kwargs)
    if name == "data/channel_stack":
        return fusion.build_fusion(name, num_classes=task.num_classes, **kwargs)
    in_dims = {m: int(np.prod(x.shape[1:])) if kind == "raw" else int(x.shape[-1]) for m, x in train.items()}
    if _level(name) == "decision":
        for k in ESTIMATOR_KWARGS:
            if kwargs.get(k) is not None:
                kwargs[k] = LogisticRegression(**{"max_iter": 1000, **kwargs[k]})
        if "cv" in inspect.signature(fusion.FUSIONS.get(name)).parameters:
            kwargs["cv"] = StratifiedKFold(int(kwargs.get("cv") or 5), shuffle=True, random_state=seed)
    return fusion.build_fusion(name, in_dims=in_dims, num_classes=task.num_classes, **kwargs)


def _seed_free(name: str, kwargs: Mapping[str, Any]) -> bool:
    """True for strategies whose fit does not depend on the seed: decision-level rules that fit nothing
    beyond the per-modality classifiers (``mean``, ``vote``) with a deterministic solver (lbfgs, the
    default, or Newton). They are fitted once and evaluated under every seed's test corruptions."""
    if name == UNIMODAL or _level(name) != "decision":
        return False
    from fusion.decision_level import DecisionFusion

    cls = fusion.FUSIONS.get(name)
    if getattr(cls, "_fit_combiner", None) is not DecisionFusion._fit_combiner:
        return False
    solver = (kwargs.get("estimator") or {}).get("solver", "lbfgs")
    return solver in ("lbfgs", "newton-cg", "newton-cholesky")


def _is_module(model: Any) -> bool:
    return isinstance(model, nn.Module)


def _model_modalities(model: Any, task: TaskData) -> tuple[str, ...]:
    return tuple(m for m in model.modalities if m in task.modalities)


@torch.no_grad()
def _predict_proba(model: Any, inputs: Mapping[str, Any], n: int | None = None, chunk: int = 512) -> np.ndarray:
    """Class probabilities [N, C] of any strategy for a dict of numpy inputs (masks included); ``n`` is
    needed only when every modality of the model is absent."""
    if not _is_module(model):
        return np.asarray(model.predict_proba(inputs))
    device = next(model.parameters()).device
    n = batch_size(inputs, model.modalities) if n is None else n
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, n, chunk):
            batch = {k: torch.as_tensor(np.asarray(v[i:i + chunk])).to(device) for k, v in inputs.items()
                     if v is not None}
            if not any(m in batch for m in model.modalities):  # every modality absent: a mask gives the size
                batch[fusion.mask_key(model.modalities[0])] = torch.zeros(min(chunk, n - i), dtype=torch.bool)
            out.append(model(batch).float().softmax(dim=-1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def _metrics(proba: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = proba.argmax(axis=1)
    return {"accuracy": 100.0 * float((pred == y).mean()),
            "macro_f1": 100.0 * float(f1_score(y, pred, average="macro", labels=np.arange(num_classes),
                                               zero_division=0))}


def _accuracy(model: Any, inputs: Mapping[str, Any], y: np.ndarray) -> float:
    return 100.0 * float((_predict_proba(model, inputs, len(y)).argmax(axis=1) == y).mean())


def _model_inputs(model: Any, views: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {m: views[m] for m in model.modalities if m in views}


def corrupt(inputs: Mapping[str, np.ndarray], modality: str, how: str, rate: float, *, noise_std: float,
            noise_scale: Any, seed: int, pixels: bool = False) -> dict[str, np.ndarray]:
    """``inputs`` with a fraction ``rate`` of the rows of ``modality`` dropped or noised.

    The corrupted rows are the first ``round(rate * N)`` of a permutation fixed by ``seed`` (so the sets are
    nested across rates and equal across strategies). ``drop``: ``"<modality>_mask"`` bool [N] is False on
    them. ``noise``: Gaussian noise of std ``noise_std * noise_scale`` (broadcast over the last axis) is
    added to them; ``pixels`` inputs (uint8) come back as float in [0, 1] after clipping to [0, 255].
    """
    x = inputs[modality]
    n = len(x)
    rng = np.random.default_rng([seed, 7])
    hit = np.zeros(n, dtype=bool)
    hit[rng.permutation(n)[: int(round(rate * n))]] = True
    out = dict(inputs)
    if how == "drop":
        out[fusion.mask_key(modality)] = ~hit
        return out
    if how != "noise":
        raise ValueError(f"unknown corruption {how!r}; known: {CORRUPTIONS}")
    noisy = np.asarray(x, dtype=np.float32).copy()
    if hit.any():
        scale = np.asarray(noise_std * np.asarray(noise_scale, dtype=np.float32), dtype=np.float32)
        eps = np.random.default_rng([seed, 8]).standard_normal(noisy[hit].shape, dtype=np.float32)
        noisy[hit] += eps * scale
    if pixels:
        noisy = np.clip(noisy, 0.0, 255.0) / 255.0
    out[modality] = noisy.astype(x.dtype) if x.dtype == np.float16 else noisy
    return out


def _latency(model: Any, inputs: Mapping[str, np.ndarray], n: int) -> float:
    """ms per sample at batch size 1 (median over ``n`` samples, after one warm-up call)."""
    n = min(n, batch_size(inputs, model.modalities))
    one = lambda i: {k: v[i:i + 1] for k, v in inputs.items()}  # noqa: E731
    _predict_proba(model, one(0))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        _predict_proba(model, one(i))
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _fit(name: str, kwargs: Mapping[str, Any], task: TaskData, cfg: Config, seed: int,
         modality: str | None = None) -> tuple[Any, float, int]:
    """Build and train (Trainer) or fit (closed form) one strategy; returns (model, train seconds, steps)."""
    from experiments.trainer import Trainer

    kind = _input_kind(name, cfg)
    views = task.views[kind]
    model = _build(name, kwargs, task, kind, seed, modality)
    train = _model_inputs(model, views["train"])
    if _is_module(model):
        val = _model_inputs(model, views["val"])
        tcfg = dataclasses.replace(cfg.train, seed=seed, monitor="accuracy", mode="max", out_dir=None)
        res = Trainer(tcfg, evaluator=lambda m: {"accuracy": _accuracy(m, val, task.labels["val"])}).fit(
            model, {**train, "label": task.labels["train"]})
        train_seconds, steps = res.train_seconds, res.steps
        model.cpu()  # evaluation and latency on CPU, like the decision-level models
    else:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # lbfgs convergence chatter
            model.fit(train, task.labels["train"])
        train_seconds, steps = time.perf_counter() - t0, 0
    return model, train_seconds, steps


def _evaluate(model: Any, train_seconds: float, steps: int, name: str, task: TaskData, cfg: Config,
              seed: int) -> dict[str, Any]:
    """Clean test and validation metrics, missing modalities, corruption curves (noise and corrupted rows
    drawn from ``seed``) and cost of a fitted strategy."""
    kind = _input_kind(name, cfg)
    views = task.views[kind]
    mods = _model_modalities(model, task)
    test = _model_inputs(model, views["test"])
    y = task.labels["test"]
    t0 = time.perf_counter()
    proba = _predict_proba(model, test)
    throughput_ms = 1000.0 * (time.perf_counter() - t0) / len(y)
    out: dict[str, Any] = {**_metrics(proba, y, task.num_classes),
                           "val_accuracy": _accuracy(model, _model_inputs(model, views["val"]), task.labels["val"])}
    clean = out["accuracy"]

    out["missing_modality"] = {}
    for m in task.modalities:
        out["missing_modality"][m] = (_accuracy(model, {k: v for k, v in test.items() if k != m}, y)
                                      if m in mods else clean)
    rates = sorted(set(float(r) for r in cfg.robustness.rates))
    out["robustness"] = {"rates": [100.0 * r for r in rates]}
    for how in CORRUPTIONS:
        curves = {}
        for j, m in enumerate(task.modalities):
            if m not in mods:
                curves[m] = [clean] * len(rates)
                continue
            curves[m] = [
                _accuracy(model, corrupt(test, m, how, r, noise_std=cfg.robustness.noise_std,
                                         noise_scale=task.noise_scale[kind][m], seed=seed * 1000 + j,
                                         pixels=kind == "pixels"), y)
                for r in rates
            ]
        out["robustness"][how] = curves

    out.update(
        params=fusion.model_params(model),
        fusion_params=fusion.fusion_module_params(model),
        train_seconds=train_seconds,
        steps=steps,
        latency_ms=_latency(model, test, cfg.latency_samples),
        throughput_ms=throughput_ms,
    )
    return out


# --------------------------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _aggregate(runs: Sequence[dict[str, Any]], seeds: Sequence[int], level: str, kind: str,
               task: TaskData) -> dict[str, Any]:
    """Mean and std over seeds; per-seed values kept under ``per_seed``."""
    out: dict[str, Any] = {"level": level, "inputs": kind}
    for key in ("accuracy", "macro_f1", "val_accuracy", "train_seconds", "latency_ms", "throughput_ms"):
        out[key], out[f"{key}_std"] = _mean_std([r[key] for r in runs])
    out["params"] = int(runs[0]["params"])
    out["fusion_params"] = int(runs[0]["fusion_params"])
    out["steps"] = int(runs[0]["steps"])
    out["missing_modality"], out["missing_modality_std"] = {}, {}
    for m in task.modalities:
        out["missing_modality"][m], out["missing_modality_std"][m] = _mean_std(
            [r["missing_modality"][m] for r in runs])
    rob: dict[str, Any] = {"rates": runs[0]["robustness"]["rates"]}
    for how in CORRUPTIONS:
        stack = {m: np.asarray([r["robustness"][how][m] for r in runs], dtype=float) for m in task.modalities}
        rob[how] = {m: a.mean(0).tolist() for m, a in stack.items()}
        rob[f"{how}_std"] = {m: (a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])).tolist()
                             for m, a in stack.items()}
    out["robustness"] = rob
    out["per_seed"] = {"seeds": list(seeds), "accuracy": [r["accuracy"] for r in runs],
                       "macro_f1": [r["macro_f1"] for r in runs], "val_accuracy": [r["val_accuracy"] for r in runs]}
    return out


def _paired_tests(entries: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, float]]:
    """Reference = highest mean validation accuracy; two-sided paired t-test (``scipy.stats.ttest_rel``)
    of every other entry's per-seed test accuracies against it. NaN with fewer than 2 seeds or when the
    per-seed differences are constant (the test is undefined)."""
    from scipy import stats

    if not entries:
        return None, {}
    ref = max(entries, key=lambda n: (entries[n]["val_accuracy"], entries[n]["accuracy"]))
    a = np.asarray(entries[ref]["per_seed"]["accuracy"])
    p = {}
    for name, e in entries.items():
        b = np.asarray(e["per_seed"]["accuracy"])
        diff = a - b
        if name == ref or len(a) < 2 or np.allclose(diff, diff[0]):
            p[name] = math.nan
        else:
            p[name] = float(stats.ttest_rel(a, b).pvalue)
    return ref, p


def _summarise_task(entries: dict[str, dict[str, Any]], task: TaskData) -> dict[str, Any]:
    """Gains, paired tests and the level comparison of one task (added to entries and returned as info)."""
    uni = {n: e for n, e in entries.items() if e["level"] == UNIMODAL}
    best_uni = max(uni, key=lambda n: uni[n]["val_accuracy"]) if uni else None
    ref, pvals = _paired_tests(entries)
    for name, e in entries.items():
        e["gain_over_best_unimodal"] = e["accuracy"] - entries[best_uni]["accuracy"] if best_uni else math.nan
        e["p_value_vs_best"] = pvals.get(name, math.nan)
    by_level = {lvl: {n: e for n, e in entries.items() if e["level"] == lvl} for lvl in fusion.LEVELS}
    best = {lvl: (max(es, key=lambda n: es[n]["accuracy"]) if es else None) for lvl, es in by_level.items()}
    best_early = [n for n in (best["data"], best["feature"]) if n is not None]
    top_early = max(best_early, key=lambda n: entries[n]["accuracy"]) if best_early else None
    dec = by_level["decision"]
    beats = None
    if top_early and dec:
        beats = all(entries[top_early]["accuracy"] > e["accuracy"] for e in dec.values())
    return {"best_unimodal": best_uni, "reference": ref, "best_per_level": best,
            "best_early_or_intermediate": top_early,
            "early_or_intermediate_beats_every_decision_level": beats}


# --------------------------------------------------------------------------------------------- run


def run(cfg: Config) -> dict[str, Any]:
    """Run the experiment; returns the results dict (also written to ``out_dir/results.json``)."""
    validate(cfg, "config")
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        with threadpool_limits(limits=cfg.num_threads):  # BLAS/OpenMP of numpy and scikit-learn alike
            return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if UNIMODAL not in cfg.strategies:
        log.warning("strategies has no 'unimodal' entry: no baselines, so no gain over the best unimodal model")
    if len(cfg.seeds) < 3:
        log.warning("%d seed(s): std and paired t-tests need at least 3 to say anything", len(cfg.seeds))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, TaskData] = {}
    sw = [t for t in cfg.tasks if t in SHAPESWORLD_TASKS]
    if sw:
        tasks.update(_shapesworld_tasks(cfg, sw))
    if "digits_halves" in cfg.tasks:
        tasks["digits_halves"] = _digits_task(cfg)
    tasks = {t: tasks[t] for t in cfg.tasks}

    plan = []  # (task, report name, strategy name, modality)
    for t, task in tasks.items():
        for name in cfg.strategies:
            if name == UNIMODAL:
                plan += [(t, f"{UNIMODAL}/{m}", name, m) for m in task.modalities]
            elif (why := _applicable(name, task)) is not None:
                log.info("%s: skipping %s (%s)", t, name, why)
            else:
                plan.append((t, name, name, None))
    n_fits = len(plan) * len(cfg.seeds)
    log.info("fusion: %d tasks, %d strategy entries, %d seeds: %d fits", len(tasks), len(plan), len(cfg.seeds),
             n_fits)

    results: dict[str, Any] = {"experiment": "fusion", "accuracy_unit": "percent", "config": to_dict(cfg),
                               "tasks": {}, "task_info": {}, "files": []}
    done = 0
    for t, task in tasks.items():
        entries: dict[str, dict[str, Any]] = {}
        for t_, report_name, name, modality in plan:
            if t_ != t:
                continue
            runs: list[dict[str, Any]] = []
            kwargs = cfg.strategies[name] or {}
            fitted = None
            for seed in cfg.seeds:
                wall, cpu = time.perf_counter(), time.process_time()
                if fitted is None or not _seed_free(name, kwargs):  # else deterministic: one fit for all seeds
                    fitted = _fit(name, kwargs, task, cfg, seed, modality)
                r = _evaluate(*fitted, name, task, cfg, seed)
                runs.append(r)
                done += 1
                log.info("[%d/%d] %s %s seed %d: accuracy %.1f%%, macro-F1 %.1f%% (train %.1f s; fit + evaluation "
                         "%.1f s wall, %.1f s CPU)", done, n_fits, t, report_name, seed, r["accuracy"], r["macro_f1"],
                         r["train_seconds"], time.perf_counter() - wall, time.process_time() - cpu)
            level = UNIMODAL if name == UNIMODAL else _level(name)
            kind = _input_kind(name, cfg)
            entries[report_name] = _aggregate(runs, cfg.seeds, level, kind, task)
        results["tasks"][t] = entries
        results["task_info"][t] = {**task.info, "class_names": task.class_names,
                                   "inputs": _describe_inputs(task), **_summarise_task(entries, task)}

    files = []
    for t in tasks:
        files += _robustness_plots(out_dir, t, results["tasks"][t], tasks[t])
    report_path = out_dir / "report_fusion.md"
    results["seconds"] = time.perf_counter() - t_start
    results["cpu_seconds"] = time.process_time() - cpu_start
    results_path = out_dir / "results.json"
    results["files"] = [str(p) for p in [results_path, report_path, *files]]
    from experiments.report import write_json, write_text_atomic

    write_text_atomic(report_path, _report(results, out_dir))
    write_json(results_path, results)
    log.info("fusion: done in %.0f s; wrote %s", results["seconds"], ", ".join(results["files"]))
    return results


def _describe_inputs(task: TaskData) -> dict[str, str]:
    """Input kind → the per-sample shape of each modality, for the report."""
    return {kind: ", ".join(f"{m} {list(x.shape[1:])}" for m, x in per_split["train"].items())
            for kind, per_split in task.views.items()}


# --------------------------------------------------------------------------------------------- report


def _robustness_plots(out_dir: Path, t: str, entries: Mapping[str, dict[str, Any]], task: TaskData) -> list[Path]:
    """``fusion_robustness_<t>.png``: accuracy when a random one of the modalities is missing for a fraction
    of the test samples (the mean of the per-modality drop curves, which is its expectation); plus one plot
    per (corruption, modality): ``fusion_robustness_<t>_<corruption>-<modality>.png``."""
    from experiments.report import curves

    styles = {n: "--" if e["level"] == UNIMODAL else (":" if e["level"] == "decision" else "-")
              for n, e in entries.items()}
    paths = []
    mean_lines = {}
    for n, e in entries.items():
        rob = e["robustness"]
        mean_lines[n] = (rob["rates"], np.mean([rob["drop"][m] for m in task.modalities], axis=0).tolist())
    paths.append(curves(out_dir / f"fusion_robustness_{t}.png", mean_lines,
                        xlabel="test samples missing one modality (chosen at random) [%]", ylabel="accuracy [%]",
                        title=f"{t}: missing modality", styles=styles))
    for how in CORRUPTIONS:
        for m in task.modalities:
            lines = {n: (e["robustness"]["rates"], e["robustness"][how][m]) for n, e in entries.items()}
            xlabel = f"test samples with {m} " + ("missing" if how == "drop" else "noised") + " [%]"
            paths.append(curves(out_dir / f"fusion_robustness_{t}_{how}-{m}.png", lines, xlabel=xlabel,
                                ylabel="accuracy [%]", title=f"{t}: {m} {'dropped' if how == 'drop' else 'noised'}",
                                styles=styles))
    return paths


def _p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def _signed(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.1f}"


def task_tables(t: str, entries: Mapping[str, dict[str, Any]], info: Mapping[str, Any]) -> str:
    """Markdown tables of one task: accuracy, cost, missing modality and robustness at the largest rate."""
    from experiments.report import fmt, markdown_table

    ref = info.get("reference")
    order = sorted(entries, key=lambda n: -entries[n]["accuracy"])
    rows = []
    for n in order:
        e = entries[n]
        seeds = " / ".join(f"{a:.1f}" for a in e["per_seed"]["accuracy"])
        rows.append([f"**{n}**" if n == ref else n, fmt(e["accuracy"], e["accuracy_std"]),
                     fmt(e["macro_f1"], e["macro_f1_std"]), _signed(e["gain_over_best_unimodal"]),
                     "ref" if n == ref else _p(e["p_value_vs_best"]), seeds, fmt(e["val_accuracy"])])
    parts = [markdown_table(["strategy", "accuracy %", "macro-F1 %", "gain vs best unimodal (pp)",
                             "p vs ref", "per-seed accuracy", "val acc %"], rows)]

    rows = [[n, e["inputs"], f"{e['params']:,}", f"{e['fusion_params']:,}", fmt(e["train_seconds"], digits=1),
             f"{e['latency_ms']:.2f}", f"{e['throughput_ms']:.3f}"] for n, e in ((n, entries[n]) for n in order)]
    parts.append(markdown_table(["strategy", "inputs", "params (whole model)", "fusion params", "train s",
                                 "latency ms/sample (batch 1)", "ms/sample (batch 512)"], rows))

    mods = list(info["modalities"])
    rob = next(iter(entries.values()))["robustness"]
    top = rob["rates"][-1]
    rows = []
    for n in order:
        e = entries[n]
        rows.append([n, fmt(e["accuracy"])]
                    + [fmt(e["missing_modality"][m]) for m in mods]
                    + [fmt(e["robustness"]["noise"][m][-1]) for m in mods])
    parts.append(markdown_table(["strategy", "clean"] + [f"{m} missing" for m in mods]
                                + [f"{m} noised ({top:.0f} %)" for m in mods], rows))
    return "\n\n".join(parts)


def _verdict(t: str, entries: Mapping[str, dict[str, Any]], info: Mapping[str, Any]) -> list[str]:
    lines = []
    best = info["best_per_level"]
    fmt_e = lambda n: f"`{n}` ({entries[n]['accuracy']:.1f} ± {entries[n]['accuracy_std']:.1f} %)"  # noqa: E731
    for lvl in fusion.LEVELS:
        if best.get(lvl):
            lines.append(f"best {lvl}-level: {fmt_e(best[lvl])}")
    if info.get("best_unimodal"):
        lines.append(f"best unimodal (by validation accuracy): {fmt_e(info['best_unimodal'])}")
    uni = info.get("best_unimodal")
    if best.get("feature") and best.get("decision"):
        f, d = entries[best["feature"]]["accuracy"], entries[best["decision"]]["accuracy"]
        extra = f"; best feature-level − best unimodal: {f - entries[uni]['accuracy']:+.1f} pp" if uni else ""
        lines.append(f"best feature-level − best decision-level: {f - d:+.1f} pp{extra}")
    beats = info.get("early_or_intermediate_beats_every_decision_level")
    top = info.get("best_early_or_intermediate")
    if beats is not None:
        dec = max((n for n, e in entries.items() if e["level"] == "decision"), key=lambda n: entries[n]["accuracy"])
        if beats:
            lines.append(f"**{top} beats every decision-level strategy** (best decision-level: {fmt_e(dec)}; "
                         f"difference {entries[top]['accuracy'] - entries[dec]['accuracy']:+.1f} pp in mean "
                         "test accuracy).")
        else:
            lines.append(f"no data- or feature-level strategy beats every decision-level one: the best, {fmt_e(top)}, "
                         f"does not beat {fmt_e(dec)}.")
    for m in info["modalities"]:
        idle = [n for n, e in entries.items() if e["level"] != UNIMODAL
                and m in e["missing_modality"] and e["accuracy"] - e["missing_modality"][m] < IGNORED_PP]
        if idle:
            lines.append(f"lose less than {IGNORED_PP:g} pp when `{m}` is missing for every test sample (so they "
                         f"barely use it): {', '.join(f'`{n}`' for n in idle)}")
    return lines


def _report(results: Mapping[str, Any], out_dir: Path) -> str:
    cfg = results["config"]
    seeds = cfg["seeds"]
    tr = cfg["train"]
    lines = [
        "# Fusion at three levels: accuracy, robustness, cost",
        "",
        f"Seeds {seeds}; every gradient model trains through the shared Trainer with the same budget "
        f"({tr['max_steps']} steps, batch {tr['batch_size']}, AdamW lr {tr['lr']}, weight decay "
        f"{tr['weight_decay']}, {tr['warmup_steps']} warm-up steps + cosine). Decision-level strategies are "
        "scikit-learn combiners of one logistic regression per modality, fitted in closed form with `fit` "
        "(the Trainer's closed-form path takes exactly two arrays `fit(X, Y)`, not a modality dict and labels).",
        "All accuracies are in percent on the test split (mean ± sample std over seeds); `val acc` is on the "
        "validation split, which also picks the reference (**bold**, `ref`) of the paired t-tests.",
        "",
        "## How to read this",
        "",
        "* **Inputs.** image: frozen ImageNet MobileNetV2 features; depth: **the same RGB network on the depth map "
        "replicated to 3 channels**; text: frozen MiniLM embedding of the noisy caption. `pooled` = global average "
        "[1280]; `grid` = the 4x4 feature map as 16 tokens, given only to "
        f"{', '.join(f'`{n}`' for n in cfg['grid_tokens'])}. The other feature-level operators average tokens "
        "before fusing, so they get the pooled vector: **where** an object is is gone before they fuse, and "
        "binding a colour to the nearest position must come from whatever the pooled vector still encodes.",
        f"* **Data level.** `data/channel_stack`: raw RGB + depth pixels area-downsampled to "
        f"{cfg['data']['cnn_pixels']} px, stacked as 4 channels into a small CNN trained from scratch (it does "
        f"not see text). `data/concat`: raw pixels downsampled to {cfg['data']['flat_pixels']} px and flattened "
        "(+ the caption as a binary bag of words), one MLP. Digits: the raw halves.",
        "* **Gain** is the difference of mean test accuracy to the best unimodal baseline (chosen by validation "
        "accuracy), in percentage points.",
        f"* **Paired t-test** (`scipy.stats.ttest_rel`, two-sided) over the {len(seeds)} seeds' test accuracies "
        "against the reference. With 3 seeds it has 2 degrees of freedom: it measures only the spread due to "
        "initialisation and batch order on one fixed dataset and test split (not the test-sampling error, which "
        "for n test samples is about sqrt(p(1-p)/n), nor a different draw of the dataset), it has little power "
        "(only large, consistent differences reach p < 0.05), and the p-values are not corrected for the many "
        "comparisons. Decision-level classifiers are deterministic (lbfgs), so their per-seed values vary only "
        "through the shuffled CV folds of `weighted`/`stacking` (`mean` and `vote` are fitted once); where the "
        "per-seed difference is constant the test is undefined (–). Read the per-seed columns.",
        "* **Cost.** `params`: the whole model (for decision level: the per-modality logistic regressions' "
        "weights plus the combiner's); `fusion params`: `fusion.fusion_module_params`, the fusion operator + head "
        "(everything after the per-modality encoders; every parameter at data level; 0 for unimodal baselines). "
        "Frozen encoders are not counted and their time is not in the latencies (per-sample encoder latency at "
        "batch 1 is listed per task); `train s` is the Trainer's wall time (or the decision-level `fit`); "
        "latency is the median over single-sample calls on CPU.",
        f"* **Robustness.** At test time a fraction of the test samples loses one modality (the strategies' "
        f"`<m>_mask`) or gets Gaussian noise of std {cfg['robustness']['noise_std']} × the training std of each "
        "input feature (data level: of each pixel channel, clipped to [0, 255]), i.e. noise is added to what "
        "each model consumes: feature noise for feature/decision level, pixel noise for data level, so the noise "
        "rows compare robustness *within* a level better than across levels. Missing inputs follow each "
        "strategy's mechanism (learned missing code, renormalised weights, masked tokens, dropped votes, zeros = "
        "training mean for data level and unimodal baselines). Same corrupted samples for every strategy.",
        "",
    ]
    for t, entries in results["tasks"].items():
        info = results["task_info"][t]
        lines += [f"## {t} ({info['kind']})", "",
                  f"{info['dataset']}; modalities: {', '.join(info['modalities'])}; "
                  f"{info['n']['train']} train / {info['n']['val']} val / {info['n']['test']} test samples; "
                  f"{len(info['class_names'])} classes.",
                  "Inputs: " + "; ".join(f"{k}: {v}" for k, v in info["inputs"].items()) + "."]
        if info.get("encoder_latency_ms"):
            lines.append("Frozen-encoder latency (batch 1, not included below): " + ", ".join(
                f"{m} {v:.1f} ms" for m, v in info["encoder_latency_ms"].items()) + ".")
        if "caption_names_nearest_colour" in info:
            lines.append(f"Text is {'used' if 'text' in info['modalities'] else 'not used'} here: the noisy caption "
                         f"names the nearest object's colour in {info['caption_names_nearest_colour']:.1f} % of the "
                         f"test scenes (it names the largest object's colour half of the time), a partial leak. "
                         f"{info['one_object_scenes']:.1f} % of the test scenes have one object, where RGB alone "
                         "answers.")
        if "caption_shape_wrong" in info:
            lines.append(f"The caption's shape word is wrong in {info['caption_shape_wrong']:.1f} % of the test "
                         "scenes.")
        lines += ["", *[f"* {v}" for v in _verdict(t, entries, info)], "", task_tables(t, entries, info), ""]
        plots = [Path(p).name for p in results["files"] if Path(p).name.startswith(f"fusion_robustness_{t}")
                 and Path(p).suffix == ".png"]
        if plots:
            lines += [f"![missing modality, {t}]({plots[0]})", "",
                      "Per modality and corruption: " + ", ".join(f"[{p}]({p})" for p in plots[1:]), ""]
    lines += [f"Total run time {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU "
              f"({cfg['num_threads'] or 'default'} torch/BLAS thread(s)).", ""]
    return "\n".join(lines)


def format_results(results: Mapping[str, Any]) -> str:
    """Markdown tables for the terminal: per task, accuracy/gain/test, cost, and missing modality."""
    parts = []
    for t, entries in results["tasks"].items():
        info = results["task_info"][t]
        parts.append(f"## {t} ({info['kind']}; modalities {', '.join(info['modalities'])})")
        parts.append("\n".join(f"- {v}" for v in _verdict(t, entries, info)))
        parts.append(task_tables(t, entries, info))
    report = next((f for f in results.get("files", []) if f.endswith("report_fusion.md")), None)
    if report:
        parts.append(f"Report: {report}")
    return "\n\n".join(parts)
