"""The bridge experiment: seed LLM connectors from an aligned space, train them, compare with random init.

Pipeline (``alignfuse run bridge_shapesworld``)::

    ShapesWorld ──MobileNetV2 (frozen, cached)──► grid [N, 16, 1280], pooled [N, 1280]
         │ captions ──MiniLM (frozen, cached)──► [n_caps, 384]
         ▼
    CCA (closed form, via the Trainer) on grid-cell features ↔ captions (each cell with one of its image's
    captions: the map is fitted on the tokens the connectors map; seeding.fit_on=pooled for pooled features)
         ▼
    shared → LLM-embedding map fitted on text only (align.seeding), composed with CCA's image side;
    its output scale (and mlp2x_gelu's shift/identity mode) chosen by step-0 NLL on 32 training captions
         ▼
    for each connector × {seeded, random}: MultimodalLM(frozen SmolLM2, connector)
         step-0 evaluation → Trainer.fit (connector only, caption loss) → final evaluation
         ▼
    results.json, report_bridge.md, bridge_loss_curves.png, projector/mm_projector.bin (+ sidecar)

Evaluation, on held-out (test-split) images:

* **caption NLL** per caption token (eos included), corpus-level, with the image, with no image
  (no image positions / no cross-attention) and with a shuffled image (each caption paired with
  another scene's image); the gap to the controls is what the image tells the LM.
  ``gain_vs_shuffled`` / ``gain_vs_no_image``: the control's NLL minus the image's, with a paired
  bootstrap 95 % interval over captions and the % of captions the image helps (:func:`paired_gain`).
* **attribute accuracy** of greedy captions: every colour word and shape word (ShapesWorld's
  synonyms, plurals too: "crimson" → red, "disc" → circle, "plus sign" → cross) is a *named
  attribute*; ``attribute_accuracy`` = named attributes that some object of the scene has / all named
  attributes (micro average; 0 when nothing is named). Also ``attribute_recall`` (distinct scene
  colours and shapes named / all of them), ``object_precision`` (named "colour shape" pairs that
  are an object of the scene), ``named_per_caption``, and the chance control
  ``attribute_accuracy_other_scene`` (the same words checked against another test scene).
* **hard-negative ranking**: for each compositional hard negative (``flat_hard_negatives``), does
  the LM give its source caption (the true caption it was edited from) a higher log-likelihood?
  % of pairs; the text-only prior (no image) is reported as ``hard_negative_ranking_no_image``.

Curves: the Trainer's history (train loss every ``log_every`` steps) and a validation caption NLL
(val split) at step 0 and every ``eval_every`` steps. ``steps_to_reach_random_final`` is the
first evaluated step at which a seeded run's validation NLL is at or below its random twin's final
validation NLL.

Seed-map diagnostics (``results["setup"]["seed_map"]``): for held-out images, how often the colour
(shape) word whose LLM embedding is nearest (cosine) to the seeded output of the pooled features is
one of the scene's colours (shapes), against chance.

``results["runs"]["<connector>/<init>"]`` holds each run's numbers; ``results["setup"]`` the data,
aligner and seed-map diagnostics; ``results["comparisons"]`` the seeded-vs-random summaries.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.config import ConfigError, check_kwargs, from_dict
from experiments.trainer import TrainConfig

log = logging.getLogger(__name__)

INITS = ("seeded", "random")
ALIGNERS = ("cca", "clip")
TARGETS = ("captions", "words")
FIT_ON = ("tokens", "pooled")


@dataclass
class VisionConfig:
    encoder: str = "mobilenet_v2"  # a registered image encoder with grid (token) features: mobilenet_v2, open_clip_image
    options: dict[str, Any] = field(default_factory=dict)  # its constructor options (mobilenet_v2: image_size =
    # data.image_size unless given; open_clip_image: model_name, pretrained = a local checkpoint file)


@dataclass
class DataConfig:
    n_scenes: int = 600
    image_size: int = 128
    seed: int = 0


#: SmolLM2-Instruct's chat format (ChatML, no system turn) with the image in the user turn. Measured on
#: ShapesWorld val captions at step 0, it gives the LM's prior a lower caption NLL than a bare "Caption:"
#: prompt and lets word-like image tokens help (oracle object words: 4.42 vs 5.62 without image).
CHATML_PROMPT = "<|im_start|>user\n{image}\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class LLMConfig:
    name_or_path: str = "smollm2"  # "smollm2", a local model directory, a hub id, or "tiny" (a random tiny Llama)
    prompt: str = CHATML_PROMPT  # text around the image tokens ({image} marks where); e.g. "Caption:" for base LMs
    max_caption_tokens: int = 40


@dataclass
class SeedingConfig:
    aligner: str = "cca"  # "cca" (closed form) or "clip" (CLIPHeads, linear heads, trained by the Trainer)
    method: str = "procrustes"  # "procrustes" (scaled orthogonal) or "lstsq" (ridge, LOO-chosen)
    target: str = "words"  # fit shared→LLM on the captions' "words" or on whole "captions" (mean token embedding)
    n_components: int = 12  # CCA components / CLIP embedding size
    reg: float = 1.0  # CCA ridge (relative)
    cca_encode_power: float = 0.0  # CCA.encode weights variate j by correlation_j ** power; 0: unweighted
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])  # output scales tried (step-0 NLL)
    mlp_mode: str = "auto"  # mlp2x_gelu through its GELU: "shift", "identity", or "auto" (lower step-0 NLL)
    n_calibration_captions: int = 32  # training captions on which scale and mlp_mode are chosen
    aligner_steps: int = 300  # CLIPHeads training steps (clip only)
    resampler_blocks: str = "pool"  # perceiver/qformer blocks start as attention "pool"ing, or stay "random"
    fit_on: str = "tokens"  # aligner fitted on feature "tokens" (grid cells, what connectors map) or "pooled" features


@dataclass
class EvalConfig:
    n_eval_images: int = 24  # test-split images evaluated
    captions_per_image: int = 2  # true captions per evaluated image for the NLLs
    max_new_tokens: int = 16  # greedy generation length
    n_val_captions: int = 24  # validation captions for the curves (val split, one per image)
    batch_size: int = 32


def _default_train() -> TrainConfig:
    return TrainConfig(max_steps=150, batch_size=8, lr=6e-4, weight_decay=0.0, warmup_steps=3, min_lr_ratio=0.1,
                       grad_clip=1.0, eval_every=10, log_every=5, monitor="val_caption_nll", mode="min",
                       progress=True)


@dataclass
class Config:
    experiment: str = "bridge"
    data: DataConfig = field(default_factory=DataConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connectors: list[str] = field(default_factory=lambda: ["linear", "mlp2x_gelu"])
    connector_options: dict[str, dict] = field(default_factory=dict)  # per connector name: constructor kwargs
    inits: list[str] = field(default_factory=lambda: list(INITS))
    seeding: SeedingConfig = field(default_factory=SeedingConfig)
    train: TrainConfig = field(default_factory=_default_train)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/bridge_shapesworld"
    cache_dir: str | None = None  # datasets and features (default: align.weights.cache_root())


# ------------------------------------------------------------------------------------------- config


def load(raw: dict, where: str = "config") -> Config:
    """Validate ``raw`` (a parsed YAML dict) into a :class:`Config`; every error names the key and the choices."""
    from align.connectors import CONNECTORS

    raw = dict(raw or {})
    if isinstance(raw.get("train"), dict) or "train" not in raw:
        # a partial train section overrides the bridge's defaults, not TrainConfig's generic ones
        raw["train"] = {**_default_train().to_dict(), **(raw.get("train") or {})}
    cfg = from_dict(Config, raw, where)
    if cfg.experiment != "bridge":
        raise ConfigError(f"{where}: experiment must be 'bridge', got {cfg.experiment!r}")
    from experiments.features import ENCODERS

    if cfg.vision.encoder not in ENCODERS.names():
        raise ConfigError(f"{where}: unknown vision.encoder {cfg.vision.encoder!r}; known encoders: "
                          f"{', '.join(ENCODERS.names())}")
    encoder_cls = ENCODERS.get(cfg.vision.encoder)
    if getattr(encoder_cls, "modality", None) != "image":
        raise ConfigError(f"{where}: vision.encoder {cfg.vision.encoder!r} encodes {encoder_cls.modality}, not images")
    check_kwargs(encoder_cls, cfg.vision.options, f"{where}.vision.options")
    known = CONNECTORS.names()
    if not cfg.connectors:
        raise ConfigError(f"{where}: connectors is empty; choose from {', '.join(known)}")
    for name in cfg.connectors:
        if name not in known:
            raise ConfigError(f"{where}: unknown connector {name!r} in connectors; known connectors: {', '.join(known)}")
    for name, opts in cfg.connector_options.items():
        if name not in known:
            raise ConfigError(f"{where}: unknown connector {name!r} in connector_options; known: {', '.join(known)}")
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: connector_options.{name} must be a mapping, got {opts!r}")
        check_kwargs(CONNECTORS.get(name), opts, f"{where}.connector_options.{name}",
                     skip=("vision_dim", "lm_dim", "num_lm_layers"))
    for init in cfg.inits:
        if init not in INITS:
            raise ConfigError(f"{where}: unknown init {init!r} in inits; choose from {', '.join(INITS)}")
    if not cfg.inits:
        raise ConfigError(f"{where}: inits is empty; choose from {', '.join(INITS)}")
    s = cfg.seeding
    for key, value, choices in (("aligner", s.aligner, ALIGNERS), ("method", s.method, ("lstsq", "procrustes")),
                                ("target", s.target, TARGETS), ("fit_on", s.fit_on, FIT_ON), ("resampler_blocks", s.resampler_blocks, ("pool", "random")), ("mlp_mode", s.mlp_mode, ("auto", "shift", "identity"))):
        if value not in choices:
            raise ConfigError(f"{where}: seeding.{key} must be one of {', '.join(choices)}, got {value!r}")
    if s.n_components < 1:
        raise ConfigError(f"{where}: seeding.n_components must be >= 1, got {s.n_components}")
    if not s.scales or any(not isinstance(x, (int, float)) or x <= 0 for x in s.scales):
        raise ConfigError(f"{where}: seeding.scales must be a non-empty list of positive numbers, got {s.scales!r}")
    if s.n_calibration_captions < 2:
        raise ConfigError(f"{where}: seeding.n_calibration_captions must be >= 2, got {s.n_calibration_captions}")
    e = cfg.eval
    if e.n_eval_images < 2 or e.captions_per_image < 1 or e.n_val_captions < 1 or e.batch_size < 2:
        raise ConfigError(f"{where}: eval needs n_eval_images >= 2, captions_per_image >= 1, n_val_captions >= 1, "
                          f"batch_size >= 2 (got {dataclasses.asdict(e)})")
    if cfg.train.monitor != "val_caption_nll" or cfg.train.mode != "min":
        raise ConfigError(f"{where}: train.monitor must be 'val_caption_nll' with mode 'min' (the bridge evaluator's "
                          f"metric), got {cfg.train.monitor!r}/{cfg.train.mode!r}")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["train"] = cfg.train.to_dict()
    return d


# ---------------------------------------------------------------------------------- attribute parsing


def _attribute_lexicon() -> tuple[dict[str, str], dict[str, str], re.Pattern]:
    """Word → canonical colour / shape, from ShapesWorld's caption vocabulary (plurals included)."""
    from experiments.data.shapesworld import COLOUR_WORDS, SHAPE_WORDS

    colours = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
    shapes: dict[str, str] = {}
    for s, ws in SHAPE_WORDS.items():
        for w in ws:
            shapes[w] = s
            shapes[w + ("es" if w.endswith(("s", "x", "sh")) else "s")] = s
    words = sorted([*colours, *shapes], key=len, reverse=True)  # "plus signs" before "plus sign"
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")
    return colours, shapes, pattern


def parse_attributes(text: str) -> list[tuple[str, str]]:
    """Named attributes of a caption in order: ``[("colour", "red"), ("shape", "circle"), ...]``."""
    colours, shapes, pattern = _attribute_lexicon()
    out = []
    for m in pattern.finditer(text.lower()):
        w = m.group(1)
        out.append(("colour", colours[w]) if w in colours else ("shape", shapes[w]))
    return out


def attribute_metrics(texts: list[str], scenes: list[dict]) -> dict[str, float]:
    """Precision/recall of the colours and shapes named in ``texts[i]`` against ``scenes[i]`` (see module doc)."""
    if len(texts) != len(scenes):
        raise ValueError(f"{len(texts)} captions but {len(scenes)} scenes")
    named = correct = other_correct = pairs = pairs_ok = recalled = scene_total = 0
    n = len(texts)
    for i, (text, scene) in enumerate(zip(texts, scenes)):
        attrs = parse_attributes(text)
        have = {("colour", o["colour"]) for o in scene["objects"]} | {("shape", o["shape"]) for o in scene["objects"]}
        other = scenes[(i + max(1, n // 2)) % n] if n > 1 else scene
        other_have = {("colour", o["colour"]) for o in other["objects"]} | {("shape", o["shape"])
                                                                            for o in other["objects"]}
        named += len(attrs)
        correct += sum(a in have for a in attrs)
        other_correct += sum(a in other_have for a in attrs)
        recalled += len(have & set(attrs))
        scene_total += len(have)
        objects = {(o["colour"], o["shape"]) for o in scene["objects"]}
        for a, b in zip(attrs, attrs[1:]):
            if a[0] == "colour" and b[0] == "shape":
                pairs += 1
                pairs_ok += (a[1], b[1]) in objects
    return {
        "attribute_accuracy": correct / named if named else 0.0,
        "attribute_accuracy_other_scene": other_correct / named if named else 0.0,
        "attribute_recall": recalled / scene_total if scene_total else 0.0,
        "object_precision": pairs_ok / pairs if pairs else 0.0,
        "named_per_caption": named / max(n, 1),
    }


# ------------------------------------------------------------------------------------------- prepare


@dataclass
class _Prepared:
    data: Any
    grid: np.ndarray  # [N, 16, 1280] float16 (memory-mapped)
    llm: Any
    tokenizer: Any
    llm_name: str
    train_set: Any  # ImageCaptionDataset
    val: dict[str, Any]
    eval_set: dict[str, Any]
    image_to_lm: Any = None
    image_to_shared: Any = None
    setup: dict[str, Any] = field(default_factory=dict)


def _prepare(cfg: Config) -> _Prepared:
    import torch

    from align.llm import load_llm, tiny_llm
    from align.mllm import ImageCaptionDataset, caption_leading_space
    from align.seeding import caption_vocabulary
    from experiments.data.shapesworld import load_shapesworld
    from experiments.features import extract_features

    setup: dict[str, Any] = {}
    t0 = time.perf_counter()
    data = load_shapesworld(n_scenes=cfg.data.n_scenes, image_size=cfg.data.image_size, seed=cfg.data.seed,
                            cache_dir=None if cfg.cache_dir is None else Path(cfg.cache_dir) / "datasets")
    cache = _feature_cache(cfg)
    encoder = _vision_encoder(cfg)
    feats = extract_features(data.images, encoder, cache=cache, dataset_fingerprint=data.fingerprint, split="all",
                             kinds=("pooled", "grid"))
    grid = feats["grid"]
    # the mean of the tokens the connectors read (MobileNetV2's pooled output is that mean; open_clip's is
    # projected to its embedding width, so it is not used)
    pooled = np.asarray(grid, dtype=np.float32).mean(1)
    setup["vision_encoder"] = encoder.name
    setup["grid_shape"] = list(grid.shape)
    train_idx, val_idx, test_idx = (data.splits[s] for s in ("train", "val", "test"))
    if len(test_idx) < cfg.eval.n_eval_images:
        raise ValueError(f"eval.n_eval_images={cfg.eval.n_eval_images} but the test split has {len(test_idx)} images; "
                         "raise data.n_scenes or lower eval.n_eval_images")
    train_caps, train_t2i = data.flat_captions("train")

    if cfg.llm.name_or_path == "tiny":
        vocab = caption_vocabulary([c for caps in data.captions for c in caps]
                                   + [c for caps in data.hard_negatives for c in caps])
        llm, tokenizer = tiny_llm(vocab + caption_vocabulary([cfg.llm.prompt]), seed=cfg.train.seed)
        llm_name = "tiny-llama (random init)"
    else:
        llm, tokenizer = load_llm(cfg.llm.name_or_path)
        llm_name = str(cfg.llm.name_or_path)
    setup["llm"] = llm_name
    setup["prepare_data_seconds"] = round(time.perf_counter() - t0, 2)

    train_set = ImageCaptionDataset(grid[train_idx], train_caps, train_t2i, tokenizer, cfg.llm.max_caption_tokens,
                                    leading_space=caption_leading_space(cfg.llm.prompt))
    # validation captions for the curves: the first caption of the first n val images
    n_val = min(cfg.eval.n_val_captions, len(val_idx))
    val = {"image": torch.from_numpy(np.asarray(grid[val_idx[:n_val]], dtype=np.float32)),
           "text": [data.captions[i][0] for i in val_idx[:n_val]]}
    # evaluation set: caption-slot-major order, so neighbouring rows show different images
    ev_idx = test_idx[: cfg.eval.n_eval_images]
    ev_grid = torch.from_numpy(np.asarray(grid[ev_idx], dtype=np.float32))
    slots = min(cfg.eval.captions_per_image, min(len(data.captions[i]) for i in ev_idx))
    rows = [(r, data.captions[i][j]) for j in range(slots) for r, i in enumerate(ev_idx)]
    negs, neg_t2i, neg_kinds = data.flat_hard_negatives(ev_idx)
    sources = [s for i in ev_idx for s in data.hard_negative_sources[i]]
    eval_set = {"image": ev_grid, "caption_rows": np.array([r for r, _ in rows]), "captions": [c for _, c in rows],
                "negatives": negs, "sources": sources, "negative_rows": neg_t2i, "negative_kinds": neg_kinds,
                "scenes": [data.scenes[i] for i in ev_idx], "truth": [data.captions[i][0] for i in ev_idx]}
    prep = _Prepared(data=data, grid=grid, llm=llm, tokenizer=tokenizer, llm_name=llm_name, train_set=train_set,
                     val=val, eval_set=eval_set, setup=setup)
    if "seeded" in cfg.inits:
        _fit_seed_maps(cfg, prep, pooled, train_idx, val_idx, train_caps, train_t2i)
        _calibrate(cfg, prep, train_idx)
    return prep


def _feature_cache(cfg: Config):
    from experiments.features import FeatureCache

    return FeatureCache(None if cfg.cache_dir is None else Path(cfg.cache_dir) / "features")


def _vision_encoder(cfg: Config):
    """The frozen image encoder of ``cfg.vision``; it must give grid (token) features."""
    from experiments.features import build_encoder

    options = dict(cfg.vision.options)
    if cfg.vision.encoder == "mobilenet_v2":
        options.setdefault("image_size", cfg.data.image_size)
    encoder = build_encoder(cfg.vision.encoder, **options)
    if "grid" not in encoder.kinds:
        raise ValueError(f"vision.encoder {cfg.vision.encoder!r} ({encoder.name}) gives no grid features, only "
                         f"{list(encoder.kinds)}; connectors need feature tokens (open_clip: use a ViT model)")
    return encoder


def _text_encoder():
    from experiments.features import build_encoder

    return build_encoder("minilm")


def _fit_seed_maps(cfg: Config, prep: _Prepared, pooled: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                   train_caps: list[str], train_t2i: np.ndarray) -> None:
    """Fit the aligner (image ↔ caption features) and the shared → LLM map; store the composed maps."""
    import torch

    from align.cca import CCA
    from align.clip import CLIPHeads
    from align.seeding import (aligner_map, caption_vocabulary, fit_text_to_lm, image_to_lm_map,
                               llm_text_embeddings, map_r2)
    from experiments.features import extract_features
    from experiments.trainer import Trainer

    s = cfg.seeding
    data = prep.data
    t0 = time.perf_counter()
    minilm = _text_encoder()
    cache = _feature_cache(cfg)
    text_feats = np.array(extract_features(train_caps, minilm, cache=cache, dataset_fingerprint=data.fingerprint,
                                             split="train-captions", kinds=("pooled",))["pooled"])
    val_caps, val_t2i = data.flat_captions("val")
    val_text = np.asarray(extract_features(val_caps, minilm, cache=cache, dataset_fingerprint=data.fingerprint,
                                           split="val-captions", kinds=("pooled",))["pooled"])
    image_rows, text_rows = _aligner_pairs(s.fit_on, pooled, prep.grid, train_idx, train_t2i, text_feats,
                                           seed=cfg.data.seed)
    if s.aligner == "cca":
        aligner = CCA(s.n_components, reg=s.reg, encode_power=s.cca_encode_power)
        Trainer(TrainConfig(progress=False)).fit(aligner, {"image": image_rows, "text": text_rows})
        val_corr = aligner.score(*_aligner_pairs(s.fit_on, pooled, prep.grid, val_idx, val_t2i, val_text,
                                                 seed=cfg.data.seed))
        prep.setup["aligner"] = {"name": "cca", "fit_on": s.fit_on, "n_pairs": len(image_rows),
                                 "n_components": s.n_components, "reg": s.reg,
                                 "encode_power": s.cca_encode_power,
                                 "train_correlations_top5": np.round(aligner.correlations_[:5], 4).tolist(),
                                 "val_correlation_mean": round(float(np.mean(val_corr)), 4)}
    else:
        aligner = CLIPHeads(image_rows.shape[1], text_feats.shape[1], embed_dim=s.n_components, head="linear")
        result = Trainer(TrainConfig(max_steps=s.aligner_steps, batch_size=256, lr=1e-3, progress=False,
                                     seed=cfg.train.seed)).fit(
            aligner, {"image": torch.from_numpy(image_rows.astype(np.float32)),
                      "text": torch.from_numpy(text_rows.astype(np.float32))})
        aligner.eval().cpu()
        prep.setup["aligner"] = {"name": "clip", "fit_on": s.fit_on, "n_pairs": len(image_rows),
                                 "embed_dim": s.n_components, "steps": result.steps}

    if s.target == "captions":
        texts, feats = train_caps, text_feats
    else:
        vocab = caption_vocabulary(train_caps)
        feats = np.asarray(minilm.encode(vocab)["pooled"])
        texts = vocab
    targets = llm_text_embeddings(prep.llm, prep.tokenizer, texts)
    shared_to_lm = fit_text_to_lm(aligner, feats, targets, s.method)
    prep.image_to_shared = aligner_map(aligner, "image")
    prep.image_to_lm = image_to_lm_map(aligner, shared_to_lm)
    seed_map: dict[str, Any] = {"target": s.target, "method": s.method, "n_text_pairs": len(texts),
                                "text_r2_train": round(map_r2(shared_to_lm, aligner_map(aligner, "text")(feats),
                                                              targets), 4)}
    if s.target == "captions":
        seed_map["text_r2_val"] = round(map_r2(shared_to_lm, aligner_map(aligner, "text")(val_text),
                                               llm_text_embeddings(prep.llm, prep.tokenizer, val_caps)), 4)
    seed_map.update(_word_retrieval(prep, pooled[val_idx], [data.scenes[i] for i in val_idx]))
    grid_out = prep.image_to_lm(np.asarray(prep.grid[train_idx[:64]], dtype=np.float64).reshape(-1, pooled.shape[1]))
    seed_map["seeded_token_norm"] = round(float(np.linalg.norm(grid_out, axis=1).mean()), 4)
    seed_map["llm_token_norm"] = round(float(prep.llm.get_input_embeddings().weight.detach().norm(dim=1).mean()), 4)
    seed_map["seconds"] = round(time.perf_counter() - t0, 2)
    prep.setup["seed_map"] = seed_map
    log.info("seed map (%s, %s): %s", s.target, s.method, prep.setup["seed_map"])


def _aligner_pairs(fit_on: str, pooled: np.ndarray, grid: np.ndarray, image_idx: np.ndarray, t2i: np.ndarray,
                   text_feats: np.ndarray, seed: int = 0, max_rows: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, text rows) the seeding aligner is fitted on.

    ``fit_on="pooled"``: each caption with its image's pooled features. ``fit_on="tokens"``: each
    feature token (grid cell) of each image with one of that image's captions, drawn at random, so
    the aligner's image map is fitted on the inputs a per-token connector applies it to (a map fitted
    on pooled features and applied to single cells amplifies each cell's deviation from the mean;
    measured on ShapesWorld val, step-0 caption NLL of seeded 16-token linear projectors: 5.44 fitted
    on pooled features, 4.95 on tokens, random init 5.27). At most ``max_rows`` rows (a seeded sample).
    """
    if fit_on == "pooled":
        return pooled[image_idx][t2i], text_feats
    rng = np.random.default_rng(seed)
    caps_of: dict[int, list[int]] = {}
    for row, image in enumerate(t2i):
        caps_of.setdefault(int(image), []).append(row)
    n_tokens = grid.shape[1]
    images = np.array(sorted(caps_of))
    cap_rows = np.array([[rng.choice(caps_of[int(i)]) for _ in range(n_tokens)] for i in images])  # [n, N]
    image_cells = np.stack([np.repeat(images, n_tokens), np.tile(np.arange(n_tokens), len(images))], 1)
    keep = np.arange(len(image_cells))
    if len(keep) > max_rows:
        keep = np.sort(rng.choice(len(keep), max_rows, replace=False))
    image_cells, cap_rows = image_cells[keep], cap_rows.reshape(-1)[keep]
    feats = np.asarray(grid[image_idx[images]], dtype=np.float32)  # [n_images, N, d]
    return feats[np.searchsorted(images, image_cells[:, 0]), image_cells[:, 1]], text_feats[cap_rows]


def _word_retrieval(prep: _Prepared, pooled: np.ndarray, scenes: list[dict]) -> dict[str, float]:
    """Does the seed map put held-out images near the LLM embeddings of their colour and shape words?

    For each image, the colour (shape) word whose LLM embedding has the highest cosine with the seeded
    output of the pooled features; % of images where that colour (shape) is in the scene, and the chance
    level (mean fraction of the six colours/shapes present).
    """
    from align.seeding import llm_text_embeddings
    from experiments.data.shapesworld import COLOURS, SHAPES

    out = prep.image_to_lm(pooled)
    out = out / np.linalg.norm(out, axis=1, keepdims=True)
    result: dict[str, float] = {}
    for attr, words in (("colour", COLOURS), ("shape", SHAPES)):
        e = llm_text_embeddings(prep.llm, prep.tokenizer, list(words))
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        top = (out @ e.T).argmax(1)
        present = [{o[attr] for o in sc["objects"]} for sc in scenes]
        result[f"{attr}_word_top1_val"] = round(100 * float(np.mean([words[t] in p for t, p in zip(top, present)])), 1)
        result[f"{attr}_word_chance"] = round(100 * float(np.mean([len(p) / len(words) for p in present])), 1)
    return result


def _calibrate(cfg: Config, prep: _Prepared, train_idx: np.ndarray) -> None:
    """Choose the seed map's output scale (and mlp2x_gelu's mode) by step-0 caption NLL on training captions."""
    import torch

    from align.connectors import build_connector
    from align.mllm import MultimodalLM
    from align.seeding import seed_connector

    s = cfg.seeding
    n = min(s.n_calibration_captions, len(train_idx))
    images = torch.from_numpy(np.asarray(prep.grid[train_idx[:n]], dtype=np.float32))
    texts = [prep.data.captions[i][0] for i in train_idx[:n]]
    b = min(cfg.eval.batch_size, n)
    rows = np.arange(n)
    d_v, d_lm = prep.grid.shape[-1], prep.llm.get_input_embeddings().embedding_dim
    base = prep.image_to_lm

    def nll(name: str, scale: float, mode: str = "shift") -> float:
        connector = build_connector(name, d_v, d_lm)
        seed_connector(connector, base.scaled(scale), features=images, mlp_mode=mode)
        model = MultimodalLM(prep.llm, prep.tokenizer, connector, prompt=cfg.llm.prompt,
                             max_caption_tokens=cfg.llm.max_caption_tokens)
        return _corpus_nll(model, images, rows, texts, "image", b)

    t0 = time.perf_counter()
    by_scale = {float(x): nll("linear", float(x)) for x in s.scales} if len(s.scales) > 1 else {}
    scale = min(by_scale, key=by_scale.get) if by_scale else float(s.scales[0])
    prep.image_to_lm = base.scaled(scale)
    calib: dict[str, Any] = {"scale": scale, "linear_nll_by_scale": by_scale}
    mode = s.mlp_mode
    if "mlp2x_gelu" in cfg.connectors and mode == "auto":
        by_mode = {m: nll("mlp2x_gelu", scale, m) for m in ("shift", "identity")}
        mode = min(by_mode, key=by_mode.get)
        calib["mlp_nll_by_mode"] = by_mode
    calib["mlp_mode"] = "shift" if mode == "auto" else mode
    calib["seconds"] = round(time.perf_counter() - t0, 2)
    prep.setup["calibration"] = calib
    log.info("seed calibration on %d training captions: %s", n, calib)


# ------------------------------------------------------------------------------------------- evaluate


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _caption_nlls(mllm: Any, images: Any, rows: np.ndarray, captions: list[str], mode: str, batch: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL ``[n]`` and token count ``[n]`` of each caption (eos included) given ``images[rows]``."""
    import torch

    total, count = [], []
    with torch.no_grad():
        for sl in _batches(len(captions), batch):
            nll, m = mllm.token_nll({"image": images[rows[sl]], "text": captions[sl]}, mode)
            total.append(nll.sum(1).double().cpu().numpy())
            count.append(m.sum(1).double().cpu().numpy())
    return np.concatenate(total), np.concatenate(count)


def _per_token(nlls: tuple[np.ndarray, np.ndarray]) -> float:
    """Corpus NLL per token of :func:`_caption_nlls` output."""
    total, count = nlls
    return float(total.sum() / max(count.sum(), 1.0))


def _corpus_nll(mllm: Any, images: Any, rows: np.ndarray, captions: list[str], mode: str, batch: int) -> float:
    """NLL per caption token over all ``captions`` (corpus level)."""
    return _per_token(_caption_nlls(mllm, images, rows, captions, mode, batch))


def paired_gain(control: tuple[np.ndarray, np.ndarray], image: tuple[np.ndarray, np.ndarray],
                n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """What the image tells the LM: corpus NLL per token under a control minus with the image.

    ``control`` and ``image`` are :func:`_caption_nlls` outputs on the same captions. Returns the
    gain (nats/token), its 95 % bootstrap interval (captions resampled, paired) and the % of
    captions whose per-token NLL is lower with the image.
    """
    (c_tot, cnt), (i_tot, cnt_i) = control, image
    if not np.array_equal(cnt, cnt_i):
        raise ValueError("paired_gain needs NLLs of the same captions (token counts differ)")
    diff = c_tot - i_tot
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boot = diff[idx].sum(1) / cnt[idx].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"gain": float(diff.sum() / cnt.sum()), "ci95": [float(lo), float(hi)],
            "captions_better_pct": float(100 * np.mean(diff > 0))}


def _ranking(mllm: Any, ev: dict[str, Any], mode: str, batch: int) -> dict[str, float]:
    import torch

    rows = ev["negative_rows"]
    ll_neg, ll_src = [], []
    with torch.no_grad():
        for sl in _batches(len(rows), batch):
            img = ev["image"][rows[sl]]
            ll_neg.append(mllm.score_captions(img, ev["negatives"][sl], mode))
            ll_src.append(mllm.score_captions(img, ev["sources"][sl], mode))
    win = (torch.cat(ll_src) > torch.cat(ll_neg)).numpy()
    out = {"all": float(win.mean() * 100)}
    kinds = np.array(ev["negative_kinds"])
    for k in sorted(set(ev["negative_kinds"])):
        out[k] = float(win[kinds == k].mean() * 100)
    return out


def _evaluate(mllm: Any, ev: dict[str, Any], cfg: Config, controls: bool = True) -> dict[str, Any]:
    """Caption NLL (+ no-image/shuffled controls), generation attribute metrics, hard-negative ranking."""
    import torch

    b = min(cfg.eval.batch_size, cfg.eval.n_eval_images)  # <= n images: a roll never pairs a row with its own image
    with_image = _caption_nlls(mllm, ev["image"], ev["caption_rows"], ev["captions"], "image", b)
    out: dict[str, Any] = {"caption_nll": _per_token(with_image)}
    if controls:
        shuffled = _caption_nlls(mllm, ev["image"], ev["caption_rows"], ev["captions"], "shuffled", b)
        out["shuffled_image_nll"] = _per_token(shuffled)
        out["gain_vs_shuffled"] = paired_gain(shuffled, with_image)
        out["gain_vs_no_image"] = paired_gain(ev["no_image_nlls"], with_image)
    rank = _ranking(mllm, ev, "image", b)
    out["hard_negative_ranking"] = rank["all"]
    out["hard_negative_ranking_by_kind"] = {k: v for k, v in rank.items() if k != "all"}
    texts: list[str] = []
    with torch.no_grad():
        for sl in _batches(len(ev["scenes"]), b):
            texts += mllm.generate(ev["image"][sl], cfg.eval.max_new_tokens)
    attrs = attribute_metrics(texts, ev["scenes"])
    out.update(attrs)
    out["samples"] = [{"generated": t, "reference": r} for t, r in zip(texts[:4], ev["truth"][:4])]
    return out


def _val_evaluator(val: dict[str, Any], batch: int):
    def evaluate(mllm: Any) -> dict[str, float]:
        rows = np.arange(len(val["text"]))
        return {"val_caption_nll": _corpus_nll(mllm, val["image"], rows, val["text"], "image", batch)}

    return evaluate


# ------------------------------------------------------------------------------------------------ run


def _build(cfg: Config, prep: _Prepared, name: str, init: str):
    import torch

    from align.connectors import build_connector
    from align.mllm import MultimodalLM
    from align.seeding import seed_connector

    d_v = prep.grid.shape[-1]
    d_lm = prep.llm.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        connector = build_connector(name, d_v, d_lm, num_lm_layers=prep.llm.config.num_hidden_layers,
                                    **cfg.connector_options.get(name, {}))
    info: dict[str, float] = {}
    if init == "seeded":
        sample = np.asarray(prep.grid[prep.data.splits["train"][:256]], dtype=np.float32)
        info = seed_connector(connector, prep.image_to_lm, image_to_shared=prep.image_to_shared, features=sample,
                              resampler_blocks=cfg.seeding.resampler_blocks,
                              mlp_mode=prep.setup.get("calibration", {}).get("mlp_mode", "shift"))
    mllm = MultimodalLM(prep.llm, prep.tokenizer, connector, prompt=cfg.llm.prompt,
                        max_caption_tokens=cfg.llm.max_caption_tokens)
    return mllm, info


def _run_one(cfg: Config, prep: _Prepared, name: str, init: str, out_dir: Path, baseline: dict[str, Any]
             ) -> dict[str, Any]:
    import torch

    from align.connectors import connector_config
    from experiments.checkpoint import save_checkpoint
    from experiments.trainer import Trainer

    key = f"{name}/{init}"
    mllm, seed_info = _build(cfg, prep, name, init)
    try:
        device = torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if cfg.train.device == "auto" else cfg.train.device))
        mllm.to(device)
        mllm.eval()
        evaluator = _val_evaluator(prep.val, min(cfg.eval.batch_size, len(prep.val["text"])))
        log.info("[%s] step-0 evaluation", key)
        with torch.no_grad():
            step0 = _evaluate(mllm, prep.eval_set, cfg)
            val0 = evaluator(mllm)["val_caption_nll"]
        run_dir = out_dir / "runs" / f"{name}-{init}"
        train_cfg = dataclasses.replace(cfg.train, out_dir=str(run_dir))
        result = Trainer(train_cfg, evaluator=evaluator).fit(mllm, prep.train_set, resume=False)
        mllm.eval()
        log.info("[%s] final evaluation", key)
        with torch.no_grad():
            final = _evaluate(mllm, prep.eval_set, cfg)
        save_checkpoint({"connector_config": connector_config(mllm.connector),
                         "state_dict": {k: v.detach().cpu() for k, v in mllm.connector.state_dict().items()},
                         "init": init, "llm": prep.llm_name, "vision_encoder": prep.setup["vision_encoder"]},
                        run_dir / "connector.pt")
    finally:
        mllm.detach()
    train_curve = [[r["step"], r["loss"]] for r in result.history if r["kind"] == "train"]
    val_curve = [[0, val0]] + [[r["step"], r["val_caption_nll"]] for r in result.history if r["kind"] == "eval"]
    return {
        "connector": name, "init": init,
        "caption_nll_step0": step0["caption_nll"], "caption_nll": final["caption_nll"],
        "no_image_nll": baseline["no_image_nll"],
        "shuffled_image_nll_step0": step0["shuffled_image_nll"], "shuffled_image_nll": final["shuffled_image_nll"],
        "gain_vs_shuffled_step0": step0["gain_vs_shuffled"], "gain_vs_shuffled": final["gain_vs_shuffled"],
        "gain_vs_no_image_step0": step0["gain_vs_no_image"], "gain_vs_no_image": final["gain_vs_no_image"],
        "attribute_accuracy_step0": step0["attribute_accuracy"], "attribute_accuracy": final["attribute_accuracy"],
        "attribute_accuracy_other_scene": final["attribute_accuracy_other_scene"],
        "attribute_accuracy_other_scene_step0": step0["attribute_accuracy_other_scene"],
        "attribute_recall": final["attribute_recall"], "object_precision": final["object_precision"],
        "named_per_caption": final["named_per_caption"], "named_per_caption_step0": step0["named_per_caption"],
        "hard_negative_ranking_step0": step0["hard_negative_ranking"],
        "hard_negative_ranking": final["hard_negative_ranking"],
        "hard_negative_ranking_by_kind": final["hard_negative_ranking_by_kind"],
        "hard_negative_ranking_no_image": baseline["hard_negative_ranking_no_image"],
        "val_caption_nll_step0": val0, "val_caption_nll": val_curve[-1][1],
        "steps": result.steps, "train_seconds": round(result.train_seconds, 2), "n_trainable": result.n_trainable,
        "seed_info": seed_info, "samples_step0": step0["samples"], "samples": final["samples"],
        "curves": {"train_loss": train_curve, "val_caption_nll": val_curve},
        "checkpoint_dir": str(run_dir),
    }


def _steps_to_reach(curve: list[list[float]], level: float) -> int | None:
    for step, value in curve:
        if value <= level:
            return int(step)
    return None


def _comparisons(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, seeded in runs.items():
        name, init = key.split("/")
        random = runs.get(f"{name}/random")
        if init != "seeded" or random is None:
            continue
        target = random["val_caption_nll"]
        reach = _steps_to_reach(seeded["curves"]["val_caption_nll"], target)
        out[name] = {
            "step0_nll_gain": random["caption_nll_step0"] - seeded["caption_nll_step0"],
            "final_nll_gain": random["caption_nll"] - seeded["caption_nll"],
            "random_final_val_nll": target,
            "seeded_steps_to_reach_random_final": reach,
            "fraction_of_random_steps": None if reach is None else reach / max(random["steps"], 1),
        }
    return out


def _plot(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per connector: validation (solid) and training (dotted) caption NLL, seeded vs random."""
    from experiments.report import curve_panels

    panels: dict[str, dict[str, tuple[list, list]]] = {}
    styles = {}
    for key, r in runs.items():
        name, init = key.split("/")
        for label, curve, style in (("val", r["curves"]["val_caption_nll"], "-"),
                                    ("train", r["curves"]["train_loss"], ":")):
            if curve:
                line = f"{init} {label}"
                panels.setdefault(name, {})[line] = ([c[0] for c in curve], [c[1] for c in curve])
                styles[line] = style
    return curve_panels(path, panels, xlabel="optimiser step", ylabel="caption NLL per token (nats)",
                        title="ShapesWorld captioning: seeded vs random connector init", styles=styles,
                        colours={f"{i} {s}": c for i, c in (("seeded", "tab:blue"), ("random", "tab:red"))
                                 for s in ("val", "train")})


def _export_best(runs: dict[str, dict[str, Any]], prep: _Prepared, cfg: Config, out_dir: Path) -> dict[str, Any] | None:
    import torch

    from align.connectors import connector_from_config
    from align.export import export_llava_projector

    candidates = [r for r in runs.values() if r["init"] == "seeded" and r["connector"] in ("mlp2x_gelu", "linear")]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r["caption_nll"])
    ckpt = torch.load(Path(best["checkpoint_dir"]) / "connector.pt", map_location="cpu", weights_only=True)
    connector = connector_from_config(ckpt["connector_config"])
    connector.load_state_dict(ckpt["state_dict"])
    path = export_llava_projector(connector, out_dir / "projector", vision_encoder=prep.setup["vision_encoder"],
                                  llm=prep.llm_name, extra={"init": "seeded", "seeding": dataclasses.asdict(cfg.seeding),
                                                            "caption_nll": best["caption_nll"]})
    return {"connector": best["connector"], "path": str(path)}


def run(cfg: Config) -> dict[str, Any]:
    """Run every connector × init; write results.json, report_bridge.md, bridge_loss_curves.png, the projector."""
    import torch

    from experiments.report import write_json, write_text_atomic

    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prep = _prepare(cfg)
    ev = prep.eval_set
    b = min(cfg.eval.batch_size, cfg.eval.n_eval_images)
    # the text-only controls do not depend on the connector: computed once, with a bare token connector
    from align.connectors import build_connector
    from align.mllm import MultimodalLM

    bare = MultimodalLM(prep.llm, prep.tokenizer, build_connector("linear", prep.grid.shape[-1],
                                                                  prep.llm.get_input_embeddings().embedding_dim),
                        prompt=cfg.llm.prompt, max_caption_tokens=cfg.llm.max_caption_tokens)
    with torch.no_grad():
        ev["no_image_nlls"] = _caption_nlls(bare, ev["image"], ev["caption_rows"], ev["captions"], "none", b)
        baseline = {"no_image_nll": _per_token(ev["no_image_nlls"]),
                    "hard_negative_ranking_no_image": _ranking(bare, ev, "none", b)["all"]}
    prep.setup["text_only"] = baseline
    runs: dict[str, dict[str, Any]] = {}
    for name in cfg.connectors:
        for init in cfg.inits:
            log.info("=== %s/%s ===", name, init)
            runs[f"{name}/{init}"] = _run_one(cfg, prep, name, init, out_dir, baseline)
    results: dict[str, Any] = {"config": to_dict(cfg), "setup": prep.setup, "runs": runs,
                               "comparisons": _comparisons(runs)}
    results["files"] = {"curves": str(_plot(runs, out_dir / "bridge_loss_curves.png"))}
    exported = _export_best(runs, prep, cfg, out_dir)
    if exported:
        results["files"]["projector"] = exported["path"]
        results["exported_connector"] = exported["connector"]
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / "results.json", results)
    write_text_atomic(out_dir / "report_bridge.md", _report(results))
    results["files"]["results"] = str(out_dir / "results.json")
    results["files"]["report"] = str(out_dir / "report_bridge.md")
    return results


# --------------------------------------------------------------------------------------------- report


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pct(accuracy: float, named: float | None) -> str:
    """Attribute accuracy in %, "–" when the captions named no colour or shape at all."""
    return "–" if named == 0 else f"{accuracy * 100:.0f}"


def _gain(g: dict[str, Any] | None) -> str:
    return "–" if not g else f"{g['gain']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]"


def format_results(results: dict[str, Any]) -> str:
    """Markdown table of the runs (and the seeded-vs-random comparison) for the terminal."""
    from experiments.report import markdown_table

    headers = ["run", "NLL step 0", "NLL final", "no image", "shuffled", "image gain vs shuffled [95% CI]",
               "attr acc 0→final (other scene)",
               "hard-neg % 0→final (text only)", "steps", "train s", "trainable"]
    rows = []
    for key, r in results["runs"].items():
        rows.append([
            key, _f(r["caption_nll_step0"]), _f(r["caption_nll"]), _f(r["no_image_nll"]), _f(r["shuffled_image_nll"]),
            _gain(r.get("gain_vs_shuffled")),
            f"{_pct(r['attribute_accuracy_step0'], r.get('named_per_caption_step0'))} → "
            f"{_pct(r['attribute_accuracy'], r.get('named_per_caption'))} "
            f"({r['attribute_accuracy_other_scene'] * 100:.0f})",
            f"{r['hard_negative_ranking_step0']:.0f} → {r['hard_negative_ranking']:.0f} "
            f"({r['hard_negative_ranking_no_image']:.0f})",
            r["steps"], _f(r["train_seconds"], 0), f"{r['n_trainable']:,}"])
    text = markdown_table(headers, rows)
    comp = results.get("comparisons") or {}
    if comp:
        crow = [[name, _f(c["step0_nll_gain"]), _f(c["final_nll_gain"]), _f(c["random_final_val_nll"]),
                 _f(c["seeded_steps_to_reach_random_final"]),
                 _f(c["fraction_of_random_steps"], 2)] for name, c in comp.items()]
        text += "\n\n" + markdown_table(
            ["connector", "step-0 NLL gain (random − seeded)", "final NLL gain", "random final val NLL",
             "seeded steps to reach it", "fraction of random's steps"], crow)
    return text


def _report(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = ["# Bridge: aligned-space seeding of LLM connectors (ShapesWorld)", "",
             f"LLM: `{setup.get('llm')}`; vision: `{setup.get('vision_encoder')}` grid {setup.get('grid_shape')}.", ""]
    if "aligner" in setup:
        lines += [f"Aligner: `{setup['aligner']}`", "", f"Seed map: `{setup.get('seed_map')}`", ""]
    lines += ["NLL: nats per caption token on held-out test images (eos included); attribute accuracy: % of named "
              "colours/shapes present in the scene (chance control: checked against another scene); hard-neg: % of "
              "(source caption, hard negative) pairs where the source is more likely (text-only prior in brackets); "
              "image gain vs shuffled: shuffled-image NLL minus image NLL, with a paired bootstrap 95% interval over "
              "captions (what this image, not any image, tells the LM).",
              "", format_results(results), "", "![loss curves](bridge_loss_curves.png)", "", "## Samples", ""]
    for key, r in results["runs"].items():
        for s in r["samples"][:2]:
            lines.append(f"- **{key}**: `{s['generated']}` (a reference: _{s['reference']}_)")
    lines += ["", f"Total time: {results.get('total_seconds')} s.", ""]
    return "\n".join(lines)
