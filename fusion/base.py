"""The fusion-strategy interface.

A fusion strategy is an ``nn.Module`` (data and feature level) or a sklearn-style
combiner (decision level) with a ``level`` attribute in ``{"data", "feature", "decision"}``
and an ``operator`` name; its report name is ``f"{level}/{operator}"``. Inputs are dicts
keyed by modality name; a modality absent from the dict is missing for that batch.
"""
from __future__ import annotations

from align.registry import Registry

LEVELS = ("data", "feature", "decision")
FUSIONS: Registry = Registry("fusion strategy", package="fusion", symbol="FUSIONS")  # discovers fusion/*.py


def build_fusion(name: str, **cfg):
    """Build a registered strategy by its ``<level>/<operator>`` name."""
    if "/" not in name or name.split("/", 1)[0] not in LEVELS:
        raise KeyError(
            f"fusion strategy names are '<level>/<operator>' with level in {LEVELS}; got {name!r}; "
            f"known: {', '.join(FUSIONS.names()) or '(none)'}"
        )
    return FUSIONS.build(name, **cfg)
