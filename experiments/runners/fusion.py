"""Fusion at three levels, compared fairly: accuracy, robustness to missing or noisy modalities, cost.

``alignfuse run fusion_shapesworld [key=value ...]`` trains and evaluates every configured strategy on every task
over several seeds and writes ``results.json``, ``report_fusion.md`` and ``fusion_robustness_<task>*.png`` into
``out_dir``. Tasks come from the data section (:mod:`experiments.tasks`): the bundled ShapesWorld benchmark
(``nearest_colour``, ``largest_shape``, ``digits_halves``) or any multi-view data::

    alignfuse run fusion_shapesworld data.name=multiview data.path=my_views.npz

Each strategy declares what it needs (``input_kind``, ``required_modalities``, ``from_inputs`` on
:class:`fusion.FusionModule`); ``grid_tokens`` feeds the listed feature-level strategies grid tokens instead of
pooled vectors. ``unimodal`` adds one :class:`fusion.UnimodalClassifier` baseline per modality. Every fit, closed
form included, goes through :class:`experiments.trainer.Trainer` with the same ``train`` budget, once per seed;
the validation split gives ``val_accuracy`` and picks the reference of the paired t-tests; the test split gives
the reported numbers and the robustness curves (:mod:`experiments.classify`). Every (task, entry, seed) is a
resumable unit under ``out_dir/units``. Report text and tables: :mod:`experiments.reports.fusion`.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

import fusion
from experiments.config import ConfigError, DataSection, Fraction, NonNegFloat, PositiveInt, RunConfig, Section, \
    TrainSection, check_kwargs, dump, load_config
from experiments.part_options import check_fusion_options
from experiments.classify import corrupt  # noqa: F401  (re-exported: the corruption used by the robustness curves)
from experiments.tasks import DEFAULT_MODALITIES, TASK_MODALITIES, known_tasks
from experiments.views import EncodersSection, check_data_section, check_encoders

log = logging.getLogger(__name__)

UNIMODAL = "unimodal"


def _default_strategies() -> dict[str, dict[str, Any]]:
    return {
        UNIMODAL: {"embed_dim": 64, "hidden": 128},
        "data/channel_stack": {"backbone": "small", "width": 16},
        "data/concat": {"hidden": 128},
        "feature/concat": {"embed_dim": 64, "hidden": 128},
        "feature/sum": {"embed_dim": 64, "hidden": 128},
        "feature/gated": {"embed_dim": 64, "hidden": 128},
        "feature/tfn": {"embed_dim": 8, "hidden": 128},
        "feature/lmf": {"embed_dim": 32, "hidden": 128, "rank": 4},
        "feature/cross_attention": {"embed_dim": 64, "hidden": 64, "num_heads": 4, "num_layers": 2},
        "decision/mean": {},
        "decision/weighted": {"cv": 3},
        "decision/vote": {},
        "decision/stacking": {"cv": 3},
    }


class RobustnessSection(Section):
    """Test-time corruption: fractions ``rates`` of the test samples lose one modality or get Gaussian noise of
    std ``noise_std`` × the training std of each input feature (pixel channel)."""

    rates: list[Fraction] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    noise_std: NonNegFloat = 1.0


class Config(RunConfig):
    """The fusion experiment (module docstring). ``tasks``: None = every task of the data; ``modalities``: task →
    modalities (a task left out keeps its default); ``strategies``: ``<level>/<operator>`` or ``unimodal`` →
    constructor options (decision level: ``estimator``/``final_estimator`` as ``LogisticRegression`` options, an
    int ``cv`` = shuffled stratified folds seeded by the run's seed). ``num_threads``: torch and BLAS threads during
    the run (1 is much faster than 2 for these small models on a shared 2-core machine; null = library default)."""

    experiment: Literal["fusion"] = "fusion"
    out_dir: str = "runs/fusion_shapesworld"
    data: DataSection = DataSection(name="shapesworld", n_scenes=3000, image_size=128, seed=0, caption_noise=0.25,
                                    cnn_pixels=64, flat_pixels=16)
    encoders: EncodersSection = EncodersSection()
    tasks: Optional[list[str]] = None
    modalities: dict[str, list[str]] = Field(default_factory=dict)
    strategies: dict[str, Optional[dict[str, Any]]] = Field(default_factory=_default_strategies, min_length=1)
    grid_tokens: list[str] = Field(default_factory=lambda: ["feature/cross_attention"])
    train: TrainSection = TrainSection(max_steps=300, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=20,
                                       grad_clip=1.0, monitor="accuracy", mode="max", progress=False, log_every=50)
    robustness: RobustnessSection = RobustnessSection()
    latency_samples: PositiveInt = 20
    num_threads: Optional[PositiveInt] = 1

    def task_modalities(self) -> dict[str, list[str]]:
        """Task → modalities for every task run (defaults filled in; [] = every view of a multi-view dataset)."""
        tasks = self.tasks or list(known_tasks(self.data.name))
        return {t: list(self.modalities.get(t) or DEFAULT_MODALITIES.get(t, ())) for t in tasks}


def strategy_class(name: str) -> Any:
    return fusion.UnimodalClassifier if name == UNIMODAL else fusion.FUSIONS.get(name)


def validate(cfg: Config, where: str = "config") -> None:
    """Check every name, key and value; raise :class:`ConfigError` naming the key at fault."""
    from sklearn.linear_model import LogisticRegression

    check_data_section(cfg.data, where)
    check_encoders(cfg.encoders, where)
    known = known_tasks(cfg.data.name)
    bad = [t for t in (cfg.tasks or []) if t not in known]
    if cfg.tasks is not None and (not cfg.tasks or bad or len(set(cfg.tasks)) != len(cfg.tasks)):
        raise ConfigError(f"{where}.tasks has unknown, repeated or no tasks {bad or cfg.tasks}; valid tasks: "
                          f"{', '.join(known)}")
    unknown = sorted(set(cfg.modalities) - set(known))
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown} in {where}.modalities; valid tasks: {', '.join(known)}")
    for task, mods in cfg.task_modalities().items():
        allowed = TASK_MODALITIES.get(task)
        if (allowed is not None and any(m not in allowed for m in mods)) or len(set(mods)) != len(mods) or (
                mods and len(mods) < 2):
            raise ConfigError(f"{where}.modalities.{task} = {mods}: give at least two distinct modalities"
                              + (f" among {list(allowed)}" if allowed else ""))
    valid = f"{UNIMODAL}, {', '.join(fusion.FUSIONS.names())}"
    for name, kwargs in cfg.strategies.items():
        key = f"{where}.strategies.{name}"
        if name != UNIMODAL and name not in fusion.FUSIONS:
            raise ConfigError(f"unknown strategy {name!r} in {where}.strategies; valid names: {valid}")
        cls = strategy_class(name)
        kwargs = dict(kwargs or {})
        check_kwargs(cls, kwargs, key, skip=("modality", "in_dim", "in_dims", "num_classes"))
        for k in ("estimator", "final_estimator"):
            if isinstance(kwargs.get(k), Mapping):
                check_kwargs(LogisticRegression, dict(kwargs[k]), f"{key}.{k}")
            elif kwargs.get(k) is not None:
                raise ConfigError(f"{key}.{k} must be a mapping of LogisticRegression kwargs, got {kwargs[k]!r}")
        cv = kwargs.get("cv")
        if cv is not None and (isinstance(cv, bool) or not isinstance(cv, int) or cv < 2):
            raise ConfigError(f"{key}.cv must be an int >= 2 (number of shuffled stratified folds), got {cv!r}")
        check_fusion_options(cls, kwargs, key, modalities=("view_a",) if name == UNIMODAL else ())
    for name in cfg.grid_tokens:
        if name not in fusion.FUSIONS or fusion.FUSIONS.get(name).level != "feature":
            feats = [n for n in fusion.FUSIONS.names() if fusion.FUSIONS.get(n).level == "feature"]
            raise ConfigError(f"{where}.grid_tokens: {name!r} is not a feature-level strategy; valid: {', '.join(feats)}")
    opts = cfg.data.options()
    for k in ("cnn_pixels", "flat_pixels"):
        if k in opts and not (isinstance(opts[k], int) and 8 <= opts[k] <= opts.get("image_size", 10**9)):
            raise ConfigError(f"{where}.data.{k} must be an int in [8, data.image_size], got {opts[k]!r}")


def load(raw: Mapping[str, Any], where: str = "config") -> Config:
    """Build and validate a :class:`Config` from a parsed YAML dict; fails (``ConfigError``) before any work."""
    cfg = load_config(Config, raw, where)
    validate(cfg, where)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dump(cfg)


@dataclass(frozen=True)
class Entry:
    """One row of a task's table: report name, strategy name (config key) and the modalities it sees."""

    report_name: str
    name: str
    modalities: tuple[str, ...]


def input_kind(cls: Any, name: str, cfg: Config) -> str:
    return "grid" if name in cfg.grid_tokens else getattr(cls, "input_kind", "pooled")


def plan(cfg: Config, task: Any) -> tuple[list[Entry], dict[str, str]]:
    """The entries of ``task`` (``unimodal`` expands to one per modality) and the skipped ones with the reason."""
    entries, skipped = [], {}
    for name in cfg.strategies:
        cls = strategy_class(name)
        if name == UNIMODAL:
            entries += [Entry(f"{UNIMODAL}/{m}", name, (m,)) for m in task.modalities]
            continue
        need = [m for m in getattr(cls, "required_modalities", ()) if m not in task.modalities]
        kind = input_kind(cls, name, cfg)
        if need:
            skipped[name] = f"needs modalities {', '.join(need)}"
        elif kind not in task.views:
            skipped[name] = f"needs {kind} inputs, which this data does not have"
        else:
            entries.append(Entry(name, name, tuple(task.modalities)))
    return entries, skipped


def fit_unit(entry: Entry, task: Any, cfg: Config, seed: int, unit_dir: Path) -> dict[str, Any]:
    """Build, fit through the Trainer (resuming from ``unit_dir``) and evaluate one entry with one seed."""
    from experiments.classify import accuracy, evaluate_classifier, model_inputs
    from experiments.trainer import Trainer

    cls = strategy_class(entry.name)
    kind = input_kind(cls, entry.name, cfg)
    views = task.views[kind]
    in_dims = {m: int(np.prod(views["train"][m].shape[1:])) if kind == "raw" else int(views["train"][m].shape[-1])
               for m in entry.modalities if m in views["train"]}  # e.g. no text pixels
    model = fusion.build_strategy(cls, in_dims, task.num_classes, seed, **(cfg.strategies[entry.name] or {}))
    train = {**model_inputs(model, views["train"]), "label": task.labels["train"]}
    val = model_inputs(model, views["val"])
    trainer = Trainer(cfg.train.trainer_config(seed, unit_dir, monitor="accuracy", mode="max"),
                      evaluator=lambda m: {"accuracy": accuracy(m, val, task.labels["val"])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # lbfgs convergence chatter
        res = trainer.fit(model, train)
    if hasattr(model, "cpu"):
        model.cpu()  # evaluation and latency on CPU, like the decision-level models
    out = evaluate_classifier(model, kind, task, cfg.robustness.rates, cfg.robustness.noise_std, seed,
                              cfg.latency_samples)
    out.update(train_seconds=res.train_seconds, steps=res.steps)
    return out


def run(cfg: Config) -> dict[str, Any]:
    """Run the experiment (resuming finished and interrupted units); returns the results dict (also written to
    ``out_dir/results.json``)."""
    validate(cfg, "config")
    from threadpoolctl import threadpool_limits

    import torch

    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        with threadpool_limits(limits=cfg.num_threads):  # BLAS/OpenMP of numpy and scikit-learn alike
            return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict[str, Any]:
    from experiments.report import write_json, write_text_atomic
    from experiments.reports.fusion import aggregate_entry, report, robustness_plots, summarise_task
    from experiments.tasks import build_tasks
    from experiments.units import Units, unit_key

    t_start, cpu_start = time.perf_counter(), time.process_time()
    if UNIMODAL not in cfg.strategies:
        log.warning("strategies has no 'unimodal' entry: no baselines, so no gain over the best unimodal model")
    if len(cfg.seeds) < 3:
        log.warning("%d seed(s): std and paired t-tests need at least 3 to say anything", len(cfg.seeds))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", to_dict(cfg))
    kinds = {"pooled"} | {input_kind(strategy_class(n), n, cfg) for n in cfg.strategies}
    tasks = build_tasks(cfg.data, cfg.task_modalities(), kinds, cfg.encoders, cfg.cache_root())
    plans = {t: plan(cfg, task) for t, task in tasks.items()}
    n_fits = sum(len(p[0]) for p in plans.values()) * len(cfg.seeds)
    log.info("fusion: %d tasks, %d seeds: %d fits", len(tasks), len(cfg.seeds), n_fits)
    units = Units(out_dir)
    results: dict[str, Any] = {"experiment": "fusion", "accuracy_unit": "percent", "config": to_dict(cfg),
                               "tasks": {}, "task_info": {}, "skipped": {}, "files": []}
    done = 0
    for t, task in tasks.items():
        entries_plan, skipped = plans[t]
        for name, why in skipped.items():
            log.info("%s: skipping %s (%s)", t, name, why)
        entries: dict[str, dict[str, Any]] = {}
        for entry in entries_plan:
            runs = []
            for seed in cfg.seeds:
                uname = f"{t}/{entry.report_name}/seed{seed}"
                key = unit_key(task.info["dataset"], task.info["fingerprint"], entry.modalities,
                               cfg.strategies[entry.name], input_kind(strategy_class(entry.name), entry.name, cfg),
                               cfg.train.model_dump(), cfg.robustness.model_dump(), cfg.encoders.model_dump(),
                               cfg.latency_samples, seed)
                r = units.result(uname, key)
                if r is None:
                    d = units.start(uname, key, {"strategy": entry.name, "options": cfg.strategies[entry.name],
                                                 "modalities": list(entry.modalities), "seed": seed})
                    r = fit_unit(entry, task, cfg, seed, d)
                    units.finish(uname, key, r)
                runs.append(r)
                done += 1
                log.info("[%d/%d] %s %s seed %d: accuracy %.1f%%, macro-F1 %.1f%% (train %.1f s)", done, n_fits, t,
                         entry.report_name, seed, r["accuracy"], r["macro_f1"], r["train_seconds"])
            cls = strategy_class(entry.name)
            entries[entry.report_name] = aggregate_entry(runs, cfg.seeds, getattr(cls, "level", UNIMODAL),
                                                         input_kind(cls, entry.name, cfg), task)
        results["tasks"][t] = entries
        results["skipped"][t] = skipped
        results["task_info"][t] = {**task.info, "class_names": task.class_names,
                                   "inputs": {k: ", ".join(f"{m} {list(x.shape[1:])}" for m, x in v["train"].items())
                                              for k, v in task.views.items()},
                                   **summarise_task(entries, task)}
    files = [p for t in tasks for p in robustness_plots(out_dir, t, results["tasks"][t], tasks[t])]
    report_path, results_path = out_dir / "report_fusion.md", out_dir / "results.json"
    results["seconds"] = time.perf_counter() - t_start
    results["cpu_seconds"] = time.process_time() - cpu_start
    results["files"] = [str(p) for p in [results_path, report_path, *files]]
    write_text_atomic(report_path, report(results, out_dir))
    write_json(results_path, results)
    log.info("fusion: done in %.0f s; wrote %s", results["seconds"], ", ".join(results["files"]))
    return results


def format_results(results: Mapping[str, Any]) -> str:
    """Markdown tables for the terminal: per task, accuracy/gain/test, cost, and missing modality."""
    from experiments.reports.fusion import format_results as fmt

    return fmt(results)
