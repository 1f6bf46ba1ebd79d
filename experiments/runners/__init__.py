"""Experiment runners: each turns a validated config into results (a dict) and files in its out_dir.

A runner module defines ``Config`` (an :class:`experiments.config.RunConfig`; its ``experiment`` field names the
runner), ``load(raw, where) -> Config`` (validates every key, value and part name before any work),
``to_dict(cfg)``, ``run(cfg) -> dict`` and ``format_results(results) -> str``. ``alignfuse run CONFIG.yaml`` picks
the runner from the YAML's ``experiment:`` key. A runner only orchestrates: data (:mod:`experiments.views`,
:mod:`experiments.tasks`) → parts × seeds as resumable units (:mod:`experiments.units`) → ``Trainer.fit`` →
evaluator → report (:mod:`experiments.reports`).
"""
from __future__ import annotations

import importlib

RUNNERS = {"align": "experiments.runners.align", "fusion": "experiments.runners.fusion",
           "bridge": "experiments.runners.bridge",
           "zero_shot": "experiments.runners.zero_shot", "cca": "experiments.runners.cca"}


def runner_module(experiment: str):
    if experiment not in RUNNERS:
        from experiments.config import ConfigError

        raise ConfigError(f"unknown experiment {experiment!r}; known experiments: {', '.join(sorted(RUNNERS))}")
    return importlib.import_module(RUNNERS[experiment])
