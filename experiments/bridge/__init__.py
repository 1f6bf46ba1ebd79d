"""The LLM bridge experiment's pieces: config, data and features, seed map, evaluation, report.

``experiments.runners.bridge`` orchestrates them; the methods live in :mod:`align` (connectors and
their seeding, :class:`align.mllm.MultimodalLM`), the ShapesWorld-specific evaluation here.
"""
