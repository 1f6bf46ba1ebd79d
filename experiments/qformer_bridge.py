"""BLIP-2's two stages in the LLM bridge: a Q-Former aligner trained on the bridge's own image tokens and captions
(stage 1: ITC + ITM + ITG, ITM also on compositional negatives of training scenes), then its query path plus a new
linear projection as the LLM connector (the ``qformer`` connector's third init, beside ``seeded`` and ``random``).

:func:`stage1_qformer_connector` is the entry point the bridge runner calls with its prepared data
(:class:`experiments.bridge.features.BridgeData`) and config; the trained aligner is cached in ``cache_dir`` under a
key of everything that determines it, so a rerun loads it instead of training it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

#: stage-1 defaults: a reduced Q-Former (MiniLM's first 2 layers) with ITM on 6 compositional negatives per image
STAGE1_DEFAULTS: dict[str, Any] = {"num_layers": 2, "max_text_len": 32, "itg_vocab": "batch", "itc_weight": 1.0,
                                   "itm_weight": 1.0, "itg_weight": 1.0}
TRAIN_DEFAULTS: dict[str, Any] = {"batch_size": 32, "lr": 1e-4, "weight_decay": 0.05, "grad_clip": 1.0}


def stage1_options(cfg: Any, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Aligner options: :data:`STAGE1_DEFAULTS`, the ``qformer`` connector's ``num_queries`` (so the LLM gets as many
    image tokens as from ``qformer/random``), then ``options``."""
    n_q = (getattr(cfg, "connector_options", None) or {}).get("qformer", {}).get("num_queries", 4)
    return {**STAGE1_DEFAULTS, "num_queries": int(n_q), **dict(options or {})}


def train_stage1_aligner(bd: Any, cfg: Any, steps: int | None = None, options: Mapping[str, Any] | None = None,
                         train: Mapping[str, Any] | None = None, negatives_per_image: int = 6,
                         cache_dir: str | Path | None = None, seed: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Train (or load from ``cache_dir``) a ``qformer`` aligner on ``bd.tokens`` of the train split ↔ its captions.

    Args:
        bd: the bridge's prepared data (``tokens`` [N, M, d_v], ``data`` the ShapesWorld with splits and captions).
        cfg: the bridge config (``seeding.aligner_steps`` is the default ``steps``, ``train.device`` the device,
            ``seeds[0]`` the default seed, ``connector_options.qformer.num_queries`` the number of queries).
        options: aligner options over :func:`stage1_options`. train: Trainer options over :data:`TRAIN_DEFAULTS`.
        negatives_per_image: compositional ITM negatives per training scene (0: in-batch mining only).
    Returns: (aligner on CPU, info: ``steps``, ``train_seconds``, ``loaded``, ``params``, ``key``).
    """
    from align.base import build_aligner
    from align.weights import write_file_atomically
    from experiments.pairs import PairedDataset
    from experiments.qformer_data import training_negatives
    from experiments.trainer import TrainConfig, Trainer

    opts = stage1_options(cfg, options)
    if negatives_per_image > 0 and getattr(bd.data, "scenes", None) is None:
        log.info("stage-1 Q-Former: %s has no scene metadata, so no compositional ITM negatives (in-batch mining only)",
                 getattr(bd.data, "name", "the data"))
        negatives_per_image = 0
    tr_opts = {**TRAIN_DEFAULTS, **dict(train or {})}
    steps = int(steps if steps is not None else cfg.seeding.aligner_steps)
    seed = int(cfg.seeds[0] if seed is None else seed)
    d_v = int(bd.tokens.shape[-1])
    key = hashlib.sha256(json.dumps({"data": bd.data.fingerprint, "vision": bd.vision, "options": opts,
                                     "train": tr_opts, "steps": steps, "seed": seed, "negatives": negatives_per_image,
                                     "tokens": list(bd.tokens.shape[1:])}, sort_keys=True, default=str).encode()
                         ).hexdigest()[:16]
    torch.manual_seed(seed)
    aligner = build_aligner("qformer", image_dim=d_v, **opts)
    info: dict[str, Any] = {"key": key, "steps": steps, "options": opts, "params": aligner.num_trainable_parameters()}
    path = None if cache_dir is None else Path(cache_dir) / f"qformer-stage1-{key}.pt"
    if path is not None and path.exists():
        aligner.load_state_dict(torch.load(path, weights_only=True))
        log.info("stage-1 Q-Former loaded from %s", path)
        return aligner.eval(), {**info, "loaded": True, "train_seconds": 0.0}
    tr = np.asarray(bd.data.splits["train"])
    texts, t2i = bd.data.flat_captions("train")
    per_text: dict[str, Any] = {"text": list(texts)}
    if negatives_per_image > 0:
        negs, srcs = training_negatives(bd.data, tr, negatives_per_image, seed=1000 + seed)
        per_text.update(hard_negative=[negs[g] for g in t2i], hard_negative_source=[srcs[g] for g in t2i])
    data = PairedDataset({"image": np.asarray(bd.tokens[tr], dtype=np.float32)}, per_text, np.asarray(t2i))
    tcfg = TrainConfig(max_steps=steps, batch_size=min(int(tr_opts["batch_size"]), len(texts)), lr=tr_opts["lr"],
                       weight_decay=tr_opts["weight_decay"], warmup_steps=max(1, steps // 15),
                       grad_clip=tr_opts["grad_clip"], seed=seed, progress=False, device=cfg.train.device)
    t0 = time.perf_counter()
    Trainer(tcfg).fit(aligner, data)
    aligner = aligner.cpu().eval()
    info.update(loaded=False, train_seconds=round(time.perf_counter() - t0, 2))
    if path is not None:
        state = aligner.state_dict()
        write_file_atomically(path, lambda f: torch.save(state, f))
    log.info("stage-1 Q-Former: %d steps in %.1f s", steps, info["train_seconds"])
    return aligner, info


def stage1_qformer_connector(bd: Any, cfg: Any, cache_dir: str | Path | None = None, steps: int | None = None,
                             options: Mapping[str, Any] | None = None, freeze_qformer: bool = False, **kwargs: Any):
    """The ``qformer`` connector's stage-1 init for the bridge: :func:`train_stage1_aligner` (``kwargs`` go there),
    then its query path + a new Linear into the LLM (:func:`align.qformer_aligner.qformer_connector`,
    ``[B, M, d_v] → [B, num_queries, d_lm]``). The stage-1 facts are in ``connector.stage1_info``."""
    from align.qformer_aligner import qformer_connector

    aligner, info = train_stage1_aligner(bd, cfg, steps=steps, options=options, cache_dir=cache_dir, **kwargs)
    lm_dim = int(bd.llm.get_input_embeddings().embedding_dim)
    torch.manual_seed(int(cfg.seeds[0]))  # the projection's init, as the other connectors' seed
    conn = qformer_connector(aligner, lm_dim, freeze_qformer=freeze_qformer)
    conn.stage1_info = info
    return conn


def build_stage1(name: str, bd: Any, cfg: Any) -> Any:
    """The ``stage1`` init of connector ``name`` from the bridge config's ``stage1`` section (steps, aligner options,
    trainer options, negatives, freezing), the aligner cached under ``cache_root()/qformer_stage1``."""
    if name not in STAGE1_BUILDERS:
        raise ValueError(f"connector {name!r} has no stage1 init; stage1 applies to: {', '.join(STAGE1_BUILDERS)}")
    s = cfg.stage1
    return STAGE1_BUILDERS[name](bd, cfg, cache_dir=Path(cfg.cache_root()) / "qformer_stage1", steps=s.steps,
                                 options=s.options, freeze_qformer=s.freeze_qformer, train=s.train,
                                 negatives_per_image=s.negatives_per_image)


def saved_connector(config: Mapping[str, Any]) -> Any | None:
    """The connector a ``stage1`` init built, rebuilt from its saved ``config`` (``bridge.json``'s ``connector``);
    ``None`` when ``config`` names another connector (a registered one: ``align.connectors.connector_from_config``)."""
    from align.qformer_aligner import QFormerConnector

    classes = {QFormerConnector.name: QFormerConnector}
    cls = classes.get(config.get("name"))
    return None if cls is None else cls(**{k: v for k, v in config.items() if k != "name"})


def check_stage1_section(section: Any, where: str) -> None:
    """Option names of the config's ``stage1`` section: aligner options (QFormerAligner's constructor) and trainer
    options (:data:`TRAIN_DEFAULTS`); a ``ConfigError`` names the key."""
    from align.qformer_aligner import QFormerAligner
    from experiments.config import ConfigError, check_kwargs

    check_kwargs(QFormerAligner, section.options, f"{where}: stage1.options", skip=("image_dim",))
    unknown = sorted(set(section.train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'stage1.train.{k}' for k in unknown)}; valid keys of "
                          f"stage1.train: {', '.join(TRAIN_DEFAULTS)}")


#: the ``stage1`` init per bridge connector: the connector name → a builder ``(bd, cfg, cache_dir=, steps=, options=,
#: freeze_qformer=, train=, negatives_per_image=) → connector`` (a connector listed here supports ``inits: [stage1]``)
STAGE1_BUILDERS: dict[str, Any] = {"qformer": stage1_qformer_connector}
