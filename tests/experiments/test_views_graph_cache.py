"""Caption graphs built for a view are cached beside its features and read back by the next run."""
from __future__ import annotations

import numpy as np
import pytest

from experiments.features import FeatureCache
from experiments.views import CaptionSource, EncodersSection, PairViews

TEXTS = ["a red circle left of a blue square", "a small green star"]


def _views(tmp_path) -> PairViews:
    src = CaptionSource("tiny", "fp0", [[t] for t in TEXTS], {"train": np.arange(2)})
    return PairViews(src, EncodersSection(), FeatureCache(tmp_path / "features"))


def test_second_run_loads_the_graphs_from_the_feature_cache(tmp_path, monkeypatch):
    from align.graph_store import TextGraphBuilder

    first = _views(tmp_path).graphs(TEXTS, "captions-train")
    files = list((tmp_path / "features").rglob("graphs.safetensors"))
    assert len(files) == 1

    def no_build(self, *args, **kwargs):
        raise AssertionError("graphs were rebuilt instead of read from the cache")

    monkeypatch.setattr(TextGraphBuilder, "build", no_build)
    second = _views(tmp_path).graphs(TEXTS, "captions-train")
    for k, v in first.as_dict().items():
        assert np.array_equal(v.numpy(), second.as_dict()[k].numpy()), k
    with pytest.raises(AssertionError, match="rebuilt"):  # other texts under the same key: rebuilt, not reused
        _views(tmp_path).graphs(TEXTS[:1], "captions-train")
