"""Experiment runners: each turns a validated config into results (a dict) and files in its out_dir.

A runner module defines ``Config`` (a dataclass; its ``experiment`` field names the runner) and
``run(cfg: Config) -> dict``. ``alignfuse run CONFIG.yaml`` picks the runner from the YAML's
``experiment:`` key.
"""
from __future__ import annotations

import importlib

RUNNERS = {"align": "experiments.runners.align", "fusion": "experiments.runners.fusion",
           "bridge": "experiments.runners.bridge"}


def runner_module(experiment: str):
    if experiment not in RUNNERS:
        from experiments.config import ConfigError

        raise ConfigError(f"unknown experiment {experiment!r}; known experiments: {', '.join(sorted(RUNNERS))}")
    return importlib.import_module(RUNNERS[experiment])
