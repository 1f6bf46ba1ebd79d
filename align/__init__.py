"""alignfuse.align: aligners that put two modalities into one space, and connectors into LLMs.

Names are imported lazily (PEP 562), so ``import align`` (or ``align.registry``) stays cheap and
pulls in open_clip / torch_geometric / transformers only when the part that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ALIGNERS": "align.base", "Aligner": "align.base", "GradientAligner": "align.base",
    "build_aligner": "align.base", "is_closed_form": "align.base", "Registry": "align.registry",
    "CCA": "align.cca", "KernelCCA": "align.cca", "CycleAE": "align.cycle_ae",
    "CLIPHeads": "align.clip", "CLIPTowers": "align.clip",
    "DeViSE": "align.devise", "flat_hit_at_k": "align.devise", "zero_shot_eval": "align.devise",
    "GNNAligner": "align.gnn", "GraphTensors": "align.graphs", "GraphTextDataset": "align.graphs",
    "TextGraphBuilder": "align.graphs", "build_caption_graphs": "align.graphs", "caption_to_graph": "align.graphs",
    "CONNECTORS": "align.connectors", "build_connector": "align.connectors", "MultimodalLM": "align.mllm",
    "load_llm": "align.llm", "seed_connector": "align.seeding", "export_llava_projector": "align.export",
    "load_llava_projector": "align.export", "export_hf_projector": "align.export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'align' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
