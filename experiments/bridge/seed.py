"""The seed map of a bridge run: fit once, returned as a value (:class:`SeedMap`), applied by each connector.

Pipeline: an aligner (CCA closed form, or CLIPHeads with linear heads) on image tokens ↔ caption
features (``seeding.text``: a bag of caption words, or MiniLM), each token paired with a caption of its image (``fit_on="tokens"``: the inputs a
per-token connector maps; ``"pooled"``: pooled features); a shared → LLM-embedding map fitted on text
only (:mod:`align.seeding`); their composition, with its output scale (and ``mlp2x_gelu``'s mode)
chosen by step-0 caption NLL on training captions (:func:`calibrate`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from align.cca import CCA
from align.clip import CLIPHeads
from align.connectors import CONNECTORS, build_connector
from align.mllm import MultimodalLM
from align.seeding import (AffineMap, aligner_map, bag_of_words, caption_vocabulary, fit_text_to_lm, image_to_lm_map,
                           llm_text_embeddings, map_r2)
from experiments.bridge.config import Config
from experiments.bridge.evaluate import corpus_nll
from experiments.bridge.features import BridgeData, feature_cache
from experiments.data.shapesworld import COLOURS, SHAPES
from experiments.features import build_encoder, extract_features
from experiments.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)
SEED_SAMPLE = 256  # training images whose tokens connectors' seeding recipes calibrate on (shifts, temperatures)


@dataclass(frozen=True)
class SeedMap:
    """The composed map image tokens → LLM embeddings (scaled), the image → shared map, a sample of training
    image tokens ``features`` [n, M, d_v] with the captions of each sample image ``texts`` (what connectors'
    recipes calibrate on), and diagnostics."""

    image_to_lm: AffineMap
    image_to_shared: AffineMap
    features: np.ndarray
    mlp_mode: str = "shift"
    info: dict[str, Any] = field(default_factory=dict)
    texts: list[list[str]] = field(default_factory=list)

    def seed(self, connector: Any, resampler_blocks: str = "pool") -> dict[str, float]:
        """``connector.seed(...)`` with this map (each connector owns its recipe)."""
        return connector.seed(self.image_to_lm, image_to_shared=self.image_to_shared, features=self.features,
                              texts=self.texts, mlp_mode=self.mlp_mode, resampler_blocks=resampler_blocks)


def aligner_pairs(fit_on: str, pooled: np.ndarray, grid: np.ndarray, image_idx: np.ndarray, t2i: np.ndarray,
                  text_feats: np.ndarray, seed: int = 0, max_rows: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, text rows) the seeding aligner is fitted on.

    ``fit_on="pooled"``: each caption with its image's pooled features. ``fit_on="tokens"``: each feature
    token of each image with one of that image's captions, drawn at random (a map fitted on pooled features
    and applied to single cells amplifies each cell's deviation from the mean). At most ``max_rows`` rows.
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


def _fit_aligner(cfg: Config, bd: BridgeData, pooled: np.ndarray, text_feats: np.ndarray, val_text: np.ndarray
                 ) -> tuple[Any, dict[str, Any], int]:
    s, data = cfg.seeding, bd.data
    train_idx, val_idx = data.splits["train"], data.splits["val"]
    _, train_t2i = data.flat_captions("train")
    _, val_t2i = data.flat_captions("val")
    image_rows, text_rows = aligner_pairs(s.fit_on, pooled, bd.tokens, train_idx, train_t2i, text_feats,
                                          seed=cfg.data.seed)
    if s.aligner == "cca":
        aligner = CCA(s.n_components, reg=s.reg, encode_power=s.cca_encode_power)
        Trainer(TrainConfig(progress=False)).fit(aligner, {"image": image_rows, "text": text_rows})
        val_corr = aligner.score(*aligner_pairs(s.fit_on, pooled, bd.tokens, val_idx, val_t2i, val_text,
                                                seed=cfg.data.seed))
        return aligner, {"name": "cca", "fit_on": s.fit_on, "n_pairs": len(image_rows),
                         "n_components": s.n_components, "reg": s.reg,
                         "train_correlations_top5": np.round(aligner.correlations_[:5], 4).tolist(),
                         "val_correlation_mean": round(float(np.mean(val_corr)), 4)}, len(image_rows)
    aligner = CLIPHeads(image_rows.shape[1], text_feats.shape[1], embed_dim=s.n_components, head="linear")
    result = Trainer(TrainConfig(max_steps=s.aligner_steps, batch_size=256, lr=1e-3, progress=False,
                                 seed=cfg.seeds[0])).fit(
        aligner, {"image": torch.from_numpy(image_rows.astype(np.float32)),
                  "text": torch.from_numpy(text_rows.astype(np.float32))})
    aligner.eval().cpu()
    return aligner, {"name": "clip", "fit_on": s.fit_on, "n_pairs": len(image_rows), "embed_dim": s.n_components,
                     "steps": result.steps}, len(image_rows)


def word_retrieval(image_to_lm: AffineMap, llm: Any, tokenizer: Any, pooled: np.ndarray, scenes: list[dict]
                   ) -> dict[str, float]:
    """% of images whose seeded pooled output is nearest (cosine) to the LLM embedding of one of the scene's
    colour (shape) words, and the chance level."""
    out = image_to_lm(pooled)
    out = out / np.linalg.norm(out, axis=1, keepdims=True)
    result: dict[str, float] = {}
    for attr, words in (("colour", COLOURS), ("shape", SHAPES)):
        e = llm_text_embeddings(llm, tokenizer, list(words))
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        top = (out @ e.T).argmax(1)
        present = [{o[attr] for o in sc["objects"]} for sc in scenes]
        result[f"{attr}_word_top1_val"] = round(100 * float(np.mean([words[t] in p for t, p in zip(top, present)])), 1)
        result[f"{attr}_word_chance"] = round(100 * float(np.mean([len(p) / len(words) for p in present])), 1)
    return result


def text_views(cfg: Config, bd: BridgeData) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The seeding aligner's text view: ``(train captions [n, d_t], val captions, vocabulary, its words [V, d_t])``.

    ``seeding.text="bow"``: bag of caption words over the training vocabulary (a word's row is one-hot);
    ``"minilm"``: MiniLM sentence embeddings (cached) of the captions and of each word."""
    data = bd.data
    train_caps, _ = data.flat_captions("train")
    val_caps, _ = data.flat_captions("val")
    vocab = caption_vocabulary(train_caps)
    if cfg.seeding.text == "bow":
        return bag_of_words(train_caps, vocab), bag_of_words(val_caps, vocab), vocab, np.eye(len(vocab), dtype=np.float32)
    minilm = build_encoder("minilm")
    train, val = (np.asarray(extract_features(c, minilm, cache=feature_cache(cfg), dataset_fingerprint=data.fingerprint,
                                              split=f"{name}-captions", kinds=("pooled",))["pooled"])
                  for name, c in (("train", train_caps), ("val", val_caps)))
    return train, val, vocab, np.asarray(minilm.encode(vocab)["pooled"])


def fit_seed_map(cfg: Config, bd: BridgeData) -> SeedMap:
    """Fit the aligner and the text map, compose them, calibrate the scale; returns the :class:`SeedMap`."""
    s, data = cfg.seeding, bd.data
    t0 = time.perf_counter()
    text_feats, val_text, vocab, word_feats = text_views(cfg, bd)
    pooled = bd.tokens.mean(1)
    aligner, aligner_info, _ = _fit_aligner(cfg, bd, pooled, text_feats, val_text)
    if s.target == "captions":
        texts, feats = data.flat_captions("train")[0], text_feats
    else:
        texts, feats = vocab, word_feats
    targets = llm_text_embeddings(bd.llm, bd.tokenizer, texts)
    shared_to_lm = fit_text_to_lm(aligner, feats, targets, s.method)
    image_to_lm = image_to_lm_map(aligner, shared_to_lm)
    info: dict[str, Any] = {"aligner": aligner_info, "text": s.text, "target": s.target, "method": s.method,
                            "n_text_pairs": len(texts),
                            "text_r2_train": round(map_r2(shared_to_lm, aligner_map(aligner, "text")(feats), targets), 4)}
    val_idx = data.splits["val"]
    if data.scenes is not None:  # colour/shape words named by the scene metadata (ShapesWorld)
        info.update(word_retrieval(image_to_lm, bd.llm, bd.tokenizer, pooled[val_idx],
                                   [data.scenes[i] for i in val_idx]))
    scale, mode, calib = calibrate(cfg, bd, image_to_lm)
    info["calibration"] = calib
    info["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("seed map: %s", info)
    sample_idx = data.splits["train"][:SEED_SAMPLE]
    return SeedMap(image_to_lm.scaled(scale), aligner_map(aligner, "image"), bd.tokens[sample_idx], mode, info,
                   texts=[list(data.captions[i]) for i in sample_idx])


def calibrate(cfg: Config, bd: BridgeData, image_to_lm: AffineMap) -> tuple[float, str, dict[str, Any]]:
    """``(scale, mlp_mode, info)``: the output scale (and mlp2x_gelu's mode) with the lowest step-0 caption NLL
    on ``seeding.n_calibration_captions`` training captions."""
    s = cfg.seeding
    train_idx = bd.data.splits["train"]
    n = min(s.n_calibration_captions, len(train_idx))
    images = torch.from_numpy(bd.tokens[train_idx[:n]])
    texts = [bd.data.captions[i][0] for i in train_idx[:n]]
    d_v, d_lm = bd.tokens.shape[-1], bd.llm.get_input_embeddings().embedding_dim

    def nll(name: str, scale: float, mode: str = "shift") -> float:
        connector = build_connector(name, d_v, d_lm)
        connector.seed(image_to_lm.scaled(scale), features=images, mlp_mode=mode)
        model = MultimodalLM(bd.llm, bd.tokenizer, connector, prompt=cfg.llm.prompt,
                             max_caption_tokens=cfg.llm.max_caption_tokens)
        return corpus_nll(model, images, np.arange(n), texts, "image", min(cfg.eval.batch_size, n))

    # tag connectors ignore image_to_lm: with only those listed, the calibration (a step-0 NLL per scale) is skipped
    needed = any(getattr(CONNECTORS.get(c), "seeds_from_lm_map", True) for c in cfg.connectors)
    by_scale = {float(x): nll("linear", float(x)) for x in s.scales} if len(s.scales) > 1 and needed else {}
    scale = min(by_scale, key=by_scale.get) if by_scale else float(s.scales[0])
    info: dict[str, Any] = {"scale": scale, "linear_nll_by_scale": by_scale}
    mode = s.mlp_mode
    if mode == "auto":
        by_mode = {m: nll("mlp2x_gelu", scale, m) for m in ("shift", "identity")} \
            if "mlp2x_gelu" in cfg.connectors else {}
        mode = min(by_mode, key=by_mode.get) if by_mode else "shift"
        info["mlp_nll_by_mode"] = by_mode
    info["mlp_mode"] = mode
    return scale, mode, info
