"""``alignfuse export-projector``: write a trained projector in LLaVA's or transformers' Llava format.

``--checkpoint`` accepts, for a ``linear`` or ``mlp2x_gelu`` connector:

* a Trainer checkpoint (``best.pt`` / ``last.pt``) of a MultimodalLM run: its ``"model"`` holds the
  connector's weights under ``connector.*`` (a MultimodalLM's state dict is its connector);
* the ``connector.pt`` the bridge runner saves in each run directory
  (``{"connector_config": {...}, "state_dict": {...}, "llm": ..., "vision_encoder": ...}``);
* a bare connector state dict (``weight``/``bias`` or ``0.weight`` ... ``2.bias``).

The connector type and sizes come from the keys and shapes.
"""
from __future__ import annotations

import argparse

NAME = "export-projector"
HELP = "export a trained linear/mlp2x_gelu connector as LLaVA's mm_projector.bin or transformers' Llava projector"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="Trainer best.pt/last.pt of a MultimodalLM run, a runner connector.pt, or a state dict")
    parser.add_argument("--format", choices=("llava", "hf"), default="llava",
                        help="llava: mm_projector.bin + mm_projector_config.json; "
                             "hf: multi_modal_projector.safetensors + config")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vision-encoder", default=None, help="recorded in the sidecar (default: from the checkpoint)")
    parser.add_argument("--llm", default=None, help="recorded in the sidecar (default: from the checkpoint)")


def connector_state(ckpt: dict) -> tuple[dict, dict]:
    """``(connector state dict, provenance)`` from any of the accepted checkpoint layouts."""
    if "state_dict" in ckpt and "connector_config" in ckpt:
        meta = {k: ckpt[k] for k in ("llm", "vision_encoder", "init") if k in ckpt}
        return dict(ckpt["state_dict"]), meta
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        model = ckpt["model"]
        inner = {k[len("connector."):]: v for k, v in model.items() if k.startswith("connector.")}
        if not inner:
            raise ValueError(f"checkpoint's model state has no connector.* keys (keys: {sorted(model)[:5]}...)")
        return inner, {"trainer_step": ckpt.get("step"), "checkpoint_kind": ckpt.get("kind")}
    return dict(ckpt), {}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from align.connectors import LinearProjector, MLPProjector
    from align.export import export_projector

    path = Path(args.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state, meta = connector_state(torch.load(path, map_location="cpu", weights_only=True))
    keys = set(state)
    if keys == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        d_lm, d_v = state["0.weight"].shape
        connector = MLPProjector(d_v, d_lm)
    elif keys == {"weight", "bias"}:
        d_lm, d_v = state["weight"].shape
        connector = LinearProjector(d_v, d_lm)
    else:
        raise ValueError(f"{path}: connector keys {sorted(keys)[:6]} are not a linear or mlp2x_gelu projector; "
                         "only those have a LLaVA format")
    connector.load_state_dict(state)
    vision = args.vision_encoder if args.vision_encoder is not None else meta.pop("vision_encoder", "")
    llm = args.llm if args.llm is not None else meta.pop("llm", "")
    out = export_projector(connector, args.out, args.format, vision_encoder=vision, llm=llm,
                           extra={"source_checkpoint": str(path), **{k: v for k, v in meta.items() if v is not None}})
    print(out)
    return 0
