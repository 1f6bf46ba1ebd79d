"""alignfuse.fusion: fusion strategies at data, feature and decision level.

Build one by its report name, ``build_fusion("<level>/<operator>", **cfg)``; ``FUSIONS.names()``
lists them. Missing-modality convention and parameter counting: see :mod:`fusion._common`.
"""
from fusion._common import FusionModule, build_strategy, fusion_module_params, mask_key, model_params
from fusion.base import FUSIONS, LEVELS, build_fusion
from fusion.data_level import ChannelStackFusion, InputConcatFusion, small_cnn, widen_first_conv
from fusion.decision_level import (
    DecisionFusion,
    LateFusionHeads,
    MeanFusion,
    StackingFusion,
    VoteFusion,
    WeightedFusion,
    combine_probabilities,
)
from fusion.unimodal import UnimodalClassifier
from fusion.feature_level import (
    ConcatFusion,
    CrossAttentionFusion,
    FeatureFusion,
    GatedFusion,
    LowRankFusion,
    SumFusion,
    TensorFusion,
)

__all__ = [
    "FUSIONS",
    "LEVELS",
    "ChannelStackFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "DecisionFusion",
    "FeatureFusion",
    "FusionModule",
    "GatedFusion",
    "InputConcatFusion",
    "LateFusionHeads",
    "LowRankFusion",
    "MeanFusion",
    "StackingFusion",
    "SumFusion",
    "TensorFusion",
    "UnimodalClassifier",
    "VoteFusion",
    "WeightedFusion",
    "build_fusion",
    "build_strategy",
    "combine_probabilities",
    "fusion_module_params",
    "mask_key",
    "model_params",
    "small_cnn",
    "widen_first_conv",
]


def _import_all_strategy_modules() -> None:
    """Import every module of this package, so a new strategy file registers itself (no import line to add)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_import_all_strategy_modules()
