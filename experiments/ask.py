"""Load a trained bridge model and ask it about images: ``load_bridge(run_dir).chat(images_uint8, question)``.

``run_dir`` is a bridge run's ``out_dir`` or the demo's output directory; the model lives in its
``model/`` (``bridge/model/`` in a demo): ``bridge.json`` (LM, vision encoder and pooling, connector
config, prompt), ``connector.pt`` (connector + style tokens) and ``adapter/`` (LoRA, peft format).
The vision encoder is the same frozen one the run used, so ``chat`` takes raw images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.connectors import connector_from_config
from align.llm import load_llm, low_precision_linears, tiny_llm
from align.mllm import MultimodalLM
from experiments.bridge.features import VisionTower, vision_encoder
from experiments.bridge.stages import ADAPTER_DIR, CONNECTOR_FILE, MODEL_FILE


def find_model_dir(run_dir: str | Path) -> Path:
    """The directory holding ``bridge.json`` under ``run_dir`` (itself, ``model/`` or ``bridge/model/``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    for d in (run_dir / "model", run_dir / "bridge" / "model", run_dir):
        if (d / MODEL_FILE).is_file():
            return d
    raise FileNotFoundError(f"{run_dir} holds no trained bridge model (looked for model/{MODEL_FILE}, "
                            f"bridge/model/{MODEL_FILE}, {MODEL_FILE}); run `alignfuse demo` or the bridge config first")


def _llm(name: str):
    if name.startswith("tiny:"):
        _, seed, words = name.split(":", 2)
        return tiny_llm(words.split(), seed=int(seed))
    return load_llm(name)


def connector_from_saved(config: dict[str, Any]) -> torch.nn.Module:
    """A saved connector from ``bridge.json``'s ``connector``: a registered one (:func:`connector_from_config`) or one
    an init builds outside the registry (the ``stage1`` init's Q-Former connector,
    :func:`experiments.qformer_bridge.saved_connector`)."""
    from experiments.qformer_bridge import saved_connector

    conn = saved_connector(config)
    return connector_from_config(config) if conn is None else conn


def load_bridge(run_dir: str | Path) -> MultimodalLM:
    """The trained :class:`MultimodalLM` of a run, with its frozen vision encoder attached (``chat`` on raw images)."""
    d = find_model_dir(run_dir)
    meta = json.loads((d / MODEL_FILE).read_text())
    missing = [f for f in (CONNECTOR_FILE,) if not (d / f).is_file()]
    if meta.get("adapter") and not (d / ADAPTER_DIR / "adapter_config.json").is_file():
        missing.append(f"{ADAPTER_DIR}/adapter_config.json")
    if missing:
        raise FileNotFoundError(f"incomplete bridge model in {d}: missing {', '.join(missing)}")
    v = meta["vision"]
    tower = VisionTower(vision_encoder(v["encoder"], v.get("options", {}), v["image_size"]), v.get("tokens"))
    llm, tokenizer = _llm(meta["llm"])
    if meta.get("linears_bf16"):  # answer with the matmul precision the model was trained with
        low_precision_linears(llm)
    model = MultimodalLM(llm, tokenizer, connector_from_saved(meta["connector"]), prompt=meta["prompt"],
                         max_caption_tokens=meta["max_caption_tokens"], vision=tower,
                         style_tokens=meta.get("style_tokens", 0))
    model.load_state_dict(torch.load(d / CONNECTOR_FILE, map_location="cpu", weights_only=True))
    if meta.get("adapter"):
        model.load_adapter(d / ADAPTER_DIR)
    return model.eval()


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image file as uint8 ``[H, W, 3]``; a clear error if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def ask(model: MultimodalLM, image: Any, question: str, max_new_tokens: int = 12) -> str:
    """One answer about one uint8 image ``[H, W, 3]``."""
    if not question or not question.strip():
        raise ValueError("empty question")
    return model.chat(np.asarray(image)[None], question, max_new_tokens)[0]
