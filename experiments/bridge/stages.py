"""The two training stages of a bridge model (LLaVA's recipe) and the files a trained model is kept in.

* :func:`build_model` — a :class:`MultimodalLM` over the run's frozen LM: connector (seeded by the
  :class:`~experiments.bridge.seed.SeedMap`, random, or ``stage1``: a stage-1 Q-Former's query path + a new
  projection, :mod:`experiments.qformer_bridge`), style tokens, content-word loss weights.
  :func:`connector_inits` says which inits a connector supports.
* :func:`train_stage1` — captions → connector (+ style tokens), through the shared Trainer.
* :func:`train_stage2` — generated dialogues → connector + LoRA adapter of the LM (peft), same Trainer.
* :func:`save_model` / :func:`experiments.ask.load_bridge` — ``bridge.json`` (how to rebuild it),
  ``connector.pt`` (connector + style tokens) and ``adapter/`` (peft format) in one directory.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from align.connectors import build_connector
from align.mllm import MultimodalLM
from align.mllm_data import DialogueDataset
from align.weights import write_file_atomically
from experiments.bridge.config import INITS, Config
from experiments.bridge.evaluate import corpus_nll
from experiments.bridge.features import BridgeData
from experiments.config import ConfigError
from experiments.data.shapesworld import COLOUR_WORDS, SHAPE_WORDS
from experiments.trainer import TrainResult, Trainer, param_groups

log = logging.getLogger(__name__)
MODEL_FILE, CONNECTOR_FILE, ADAPTER_DIR = "bridge.json", "connector.pt", "adapter"


class BridgeTrainer(Trainer):
    """The shared Trainer with per-part learning rates: the connector's ``lr * connector_lr_scale``, the style
    tokens' ``lr * style_lr_scale``; the LoRA adapter keeps ``lr``."""

    def __init__(self, *args: Any, connector_lr_scale: float = 1.0, style_lr_scale: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connector_lr_scale, self.style_lr_scale = connector_lr_scale, style_lr_scale

    def configure_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        inner = getattr(model, "module", model)
        part = {id(p): "connector" for p in inner.connector.parameters()}
        if inner.style is not None:
            part[id(inner.style)] = "style"
        scale = {"connector": self.connector_lr_scale, "style": self.style_lr_scale, "other": 1.0}
        groups = []
        for g in param_groups(model, self.config.weight_decay):
            for name in scale:
                ps = [p for p in g["params"] if part.get(id(p), "other") == name]
                if ps:
                    groups.append({**g, "params": ps, "lr": self.config.lr * scale[name]})
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)


def content_weights(tokenizer: Any, weight: float) -> torch.Tensor | None:
    """``[vocab]`` loss weights: ``weight`` for the tokens of colour and shape words (with a leading space,
    as they read in a caption), 1 elsewhere; ``None`` for ``weight == 1``."""
    if weight == 1.0:
        return None
    w = torch.ones(len(tokenizer))
    words = [x for ws in (*COLOUR_WORDS.values(), *SHAPE_WORDS.values()) for x in ws]
    for word in words:
        for text in (" " + word, word):
            w[tokenizer(text, add_special_tokens=False)["input_ids"]] = weight
    return w


def connector_inits(name: str) -> tuple[str, ...]:
    """The inits connector ``name`` supports: its class's ``inits`` attribute (default :data:`INITS`: seeded,
    random), plus ``stage1`` where :data:`experiments.qformer_bridge.STAGE1_BUILDERS` has a builder for it."""
    from align.connectors import CONNECTORS
    from experiments.qformer_bridge import STAGE1_BUILDERS

    base = tuple(getattr(CONNECTORS.get(name), "inits", INITS))
    return base + (("stage1",) if name in STAGE1_BUILDERS and "stage1" not in base else ())


def check_inits(cfg: Config, where: str) -> None:
    """Every listed init applies to at least one listed connector (``inits``) and to the stage-2 connector
    (``stage2.inits``); the ``stage1`` section's option names when ``stage1`` is listed. Raises ``ConfigError``."""
    from align.connectors import CONNECTORS

    for init in cfg.inits:
        if not any(init in connector_inits(n) for n in cfg.connectors):
            fits = [n for n in CONNECTORS.names() if init in connector_inits(n)]
            raise ConfigError(f"{where}: inits: {init!r} applies to none of connectors {cfg.connectors} (it applies "
                              f"to: {', '.join(fits)}); list one of those connectors or drop {init!r}")
    s2 = cfg.stage2.connector or cfg.connectors[0]
    bad = [i for i in cfg.stage2.inits if i not in connector_inits(s2)]
    if cfg.stage2.enabled and bad:
        raise ConfigError(f"{where}: stage2.inits: {bad} do not apply to the stage-2 connector {s2!r} (it supports "
                          f"{list(connector_inits(s2))}); set stage2.connector or drop them")
    if "stage1" in cfg.inits:
        from experiments.qformer_bridge import check_stage1_section

        check_stage1_section(cfg.stage1, where)


def build_model(cfg: Config, bd: BridgeData, name: str, init: str, seed_map: Any | None
                ) -> tuple[MultimodalLM, dict[str, Any]]:
    """The connector (seeded, random, or from a stage-1 aligner, with the run's seed) inside a MultimodalLM over the
    frozen LM."""
    d_v, d_lm = bd.tokens.shape[-1], bd.llm.get_input_embeddings().embedding_dim
    if init not in connector_inits(name):
        raise ValueError(f"connector {name!r} has no init {init!r} (it supports {list(connector_inits(name))})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seeds[0])
        if init == "stage1":  # the trained (or cached) stage-1 aligner's query path + a new projection
            from experiments.qformer_bridge import build_stage1

            connector = build_stage1(name, bd, cfg)
        else:
            connector = build_connector(name, d_v, d_lm, num_lm_layers=bd.llm.config.num_hidden_layers,
                                        **cfg.connector_options.get(name, {}))
    if hasattr(connector, "bind"):  # a connector over the LM's own word embeddings (word_mixture)
        connector.bind(bd.llm, bd.tokenizer, bd.data.flat_captions("train")[0])
    info: dict[str, Any] = dict(getattr(connector, "stage1_info", {}))
    if init == "seeded":
        if seed_map is None:
            raise ValueError("init 'seeded' needs the run's seed map")
        info = seed_map.seed(connector, cfg.seeding.resampler_blocks)
    model = MultimodalLM(bd.llm, bd.tokenizer, connector, prompt=cfg.llm.prompt,
                         max_caption_tokens=cfg.llm.max_caption_tokens, style_tokens=cfg.method.style_tokens,
                         head_dtype=torch.bfloat16 if cfg.llm.head_bf16 else None,
                         token_weights=content_weights(bd.tokenizer, cfg.method.content_weight),
                         style_position=cfg.method.style_position)
    return model, info


def _val_evaluator(val: dict[str, Any], batch: int):
    def evaluate(mllm: Any) -> dict[str, float]:
        return {"val_caption_nll": corpus_nll(mllm, val["image"], np.arange(len(val["text"])), val["text"], "image",
                                              batch)}

    return evaluate


def train_stage1(cfg: Config, bd: BridgeData, model: MultimodalLM, unit_dir: Path) -> tuple[TrainResult, float]:
    """Caption training (resumes from ``unit_dir/last.pt``); returns the Trainer's result and the step-0 val NLL."""
    evaluator = _val_evaluator(bd.val, min(cfg.eval.batch_size, len(bd.val["text"])))
    with torch.no_grad():
        val0 = evaluator(model.eval())["val_caption_nll"]
    trainer = BridgeTrainer(cfg.train.trainer_config(seed=cfg.seeds[0], out_dir=unit_dir), evaluator=evaluator,
                            connector_lr_scale=cfg.method.connector_lr_scale, style_lr_scale=cfg.method.style_lr_scale)
    result = trainer.fit(model, bd.train_set, resume=True)
    return result, val0


def dialogue_set(cfg: Config, bd: BridgeData, model: MultimodalLM, dialogues: list, rows: np.ndarray) -> Dataset:
    train_idx = bd.data.splits["train"]
    return DialogueDataset(bd.tokens[train_idx], dialogues, rows, bd.tokenizer, model.chat_format)


def train_stage2(cfg: Config, model: MultimodalLM, dataset: Dataset, unit_dir: Path) -> TrainResult:
    """LoRA adapter on the LM + the connector (+ style tokens) on answer loss; base weights stay frozen."""
    s = cfg.stage2
    model.add_lora(s.lora_r, s.lora_alpha, s.lora_targets)
    model.train()
    trainer = BridgeTrainer(s.train.trainer_config(seed=cfg.seeds[0], out_dir=unit_dir),
                            connector_lr_scale=cfg.method.connector_lr_scale, style_lr_scale=cfg.method.style_lr_scale)
    return trainer.fit(model, dataset, resume=True)


def save_model(model: MultimodalLM, directory: Path, cfg: Config, bd: BridgeData, extra: dict[str, Any]) -> Path:
    """``bridge.json`` + ``connector.pt`` (+ ``adapter/`` in peft format when the model has one)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("adapter.")}
    write_file_atomically(directory / CONNECTOR_FILE, lambda p: torch.save(state, p))
    if model._peft is not None:
        model.save_adapter(directory / ADAPTER_DIR)
    meta = {"format": "alignfuse-bridge", "llm": bd.llm_name, "connector": model.connector.config,
            "prompt": model.prompt, "max_caption_tokens": model.max_caption_tokens,
            "style_tokens": 0 if model.style is None else int(model.style.shape[0]),
            "vision": bd.vision, "adapter": model._peft is not None,
            "linears_bf16": bool(bd.setup.get("linears_bf16")), **extra}
    write_file_atomically(directory / MODEL_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return directory
