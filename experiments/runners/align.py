"""The aligner comparison: every aligner on the same cached inputs of any image–caption data, several seeds.

Each aligner class declares the input kind it takes per batch key (``inputs``, e.g. ``{"image": "vector",
"text": "vector"}`` or ``{"image": "grid", "text": "graph"}``) and builds itself from the data's dimensions
(``from_inputs``); :class:`experiments.views.PairViews` provides every kind the data offers, through the encoders
named in ``encoders``. The runner never branches on an aligner's name.

Data: ``data.name`` is ``shapesworld``, ``digits`` (``view: halves`` pairs the two halves of each scan), ``csv``
(``path``, ``img_key``, ``caption_key``, ``sep``, ``image_root``), ``karpathy`` (``path``, ``image_root``; splits
from the file), ``embeddings`` (``image_npy``, ``text_npy``, ``text_to_image_npy``) or any registered loader that
returns ``ImageTextData``::

    alignfuse run align_shapesworld data.name=karpathy data.path=dataset_flickr8k.json data.image_root=images/

Every (aligner, seed) is a unit under ``out_dir/units`` (:mod:`experiments.units`): rerunning the command resumes
an interrupted unit from its checkpoint and keeps finished ones.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from experiments.config import ConfigError, DataSection, RunConfig, TrainSection, dump, load_config
from experiments.part_options import check_aligner_options
from experiments.views import EncodersSection, check_data_section, check_encoders

log = logging.getLogger(__name__)

RUNNER_KEYS = ("train", "pairing_ratios")  # keys of an aligner's section that configure the run, not the model


class Config(RunConfig):
    """The aligner comparison. ``aligners``: registry name → constructor options (plus ``train``: a partial train
    section merged onto the run's, and ``pairing_ratios``: also train with only that share of pairs known)."""

    experiment: Literal["align"] = "align"
    out_dir: str = "runs/align"
    data: DataSection = DataSection(name="shapesworld", n_scenes=2000, image_size=128, max_eval_images=1000)
    encoders: EncodersSection = EncodersSection()
    aligners: dict[str, Optional[dict[str, Any]]] = Field(default_factory=lambda: {"cca": {"n_components": 64}})
    train: TrainSection = TrainSection(max_steps=300, batch_size=256, lr=1e-3, weight_decay=0.05, warmup_steps=20)
    feature_batch_size: int = Field(default=64, ge=1, strict=True)


def validate(cfg: Config, where: str = "config") -> None:
    """Data, encoders, every aligner name, option (name, type and value: :mod:`experiments.part_options`) and
    per-aligner ``train`` section; ConfigError on any problem."""
    from align.base import ALIGNERS

    check_data_section(cfg.data, where)
    check_encoders(cfg.encoders, where)
    if not cfg.aligners:
        raise ConfigError(f"{where}: aligners is empty; known aligners: {', '.join(ALIGNERS.names())}")
    for name, section in cfg.aligners.items():
        if name not in ALIGNERS:
            raise ConfigError(f"{where}: unknown aligner {name!r}; known aligners: {', '.join(ALIGNERS.names())}")
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where}: aligners.{name} must be a mapping of options (or null), got {section!r}")
        check_aligner_options(name, model_kwargs(section), f"aligners.{name}", source=where)
        cfg.train.merged((section or {}).get("train"), where, f"aligners.{name}.train")
        for r in (section or {}).get("pairing_ratios") or []:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ConfigError(f"{where}: aligners.{name}.pairing_ratios must be fractions in (0, 1], got {r!r}")


def load(raw: dict, where: str = "config") -> Config:
    """Validate a raw config dict (every key, value, aligner name and option) into a :class:`Config`."""
    cfg = load_config(Config, raw, where)
    validate(cfg, where)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dump(cfg)


def model_kwargs(section: dict | None) -> dict[str, Any]:
    return {k: v for k, v in (section or {}).items() if k not in RUNNER_KEYS}


def build_views(cfg: Config):
    from experiments.views import pair_views

    return pair_views(cfg.data, cfg.encoders, cfg.cache_root(), cfg.feature_batch_size)


def build_aligner(name: str, section: dict | None, views: Any) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """(aligner, input dims, constructor context) for ``name`` on ``views`` (class embeddings for label inputs)."""
    from align.base import ALIGNERS

    cls = ALIGNERS.get(name)
    context = {"class_embeddings": views.class_embeddings()} if "label" in cls.inputs else {}
    dims = views.dims(cls.inputs)
    return cls.from_inputs(dims, **context, **model_kwargs(section)), dims, context


def run_unit(name: str, section: dict | None, cfg: Config, views: Any, seed: int, unit_dir: Path,
             pairing_ratio: float | None = None, save_embeddings: bool = False) -> dict[str, Any]:
    """Build, train (or fit, resuming from ``unit_dir``) and evaluate aligner ``name`` with one seed."""
    from align.base import ALIGNERS
    from experiments.align_eval import evaluate_aligner, train_pairs, trained_params
    from experiments.trainer import Trainer

    cls = ALIGNERS.get(name)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model, dims, context = build_aligner(name, section, views)
    if context:
        torch.save({k: v for k, v in context.items()}, unit_dir / "context.pt")
    train = cfg.train.merged((section or {}).get("train"), key=f"aligners.{name}.train")
    result = Trainer(train.trainer_config(seed, unit_dir)).fit(model, train_pairs(cls.inputs, views, seed,
                                                                                   pairing_ratio))
    if hasattr(model, "save") and not isinstance(model, torch.nn.Module):
        model.save(unit_dir / "model.npz")
    metrics = evaluate_aligner(model, cls.inputs, views, unit_dir / "embeddings" if save_embeddings else None)
    metrics.update(train_seconds=result.train_seconds, params_trained=trained_params(model, result.n_trainable), steps=result.steps)
    return metrics


def run(cfg: Config) -> dict[str, Any]:
    """Run every aligner over every seed (resuming finished and interrupted units); write results.json,
    report_align.md and plots into ``out_dir``."""
    from align.base import ALIGNERS
    from align.graph_store import graph_format
    from experiments.report import aggregate_seeds, write_json, write_text_atomic
    from experiments.reports.align import format_results, plots
    from experiments.units import Units, unit_key

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    views = build_views(cfg)
    units = Units(out)
    results: dict[str, Any] = {"data": {**cfg.data.model_dump(), "inputs": views.describe()},
                               "encoders": cfg.encoders.model_dump(), "seeds": list(cfg.seeds), "aligners": {},
                               "skipped": {}}

    def unit(name: str, section: dict | None, seed: int, ratio: float | None = None, first: bool = False) -> dict:
        uname = f"{name}/seed{seed}" if ratio is None else f"{name}/pairing{ratio:g}/seed{seed}"
        graphs = "graph" in ALIGNERS.get(name).inputs.values()  # caption graphs: their parser and word features
        key = unit_key(views.src.fingerprint, cfg.encoders.model_dump(), section, cfg.train.model_dump(), seed,
                       ratio, cfg.data.model_dump(), *([graph_format()] if graphs else []))
        done = units.result(uname, key)
        if done is not None:
            log.info("%s: finished in an earlier run", uname)
            return done
        d = units.start(uname, key, {"aligner": name, "options": model_kwargs(section), "seed": seed,
                                     "pairing_ratio": ratio, "inputs": ALIGNERS.get(name).inputs,
                                     "dims": views.dims(ALIGNERS.get(name).inputs)})
        log.info("aligner %s, seed %d%s", name, seed, "" if ratio is None else f", pairing ratio {ratio:g}")
        r = run_unit(name, section, cfg, views, seed, d, ratio, save_embeddings=first)
        units.finish(uname, key, r)
        return r

    for name, section in cfg.aligners.items():
        missing = views.missing(ALIGNERS.get(name).inputs)
        if missing:
            results["skipped"][name] = f"needs inputs this data view lacks: {', '.join(missing)}"
            log.info("skipping %s: %s", name, results["skipped"][name])
            continue
        per_seed = [unit(name, section, s, first=i == 0) for i, s in enumerate(cfg.seeds)]
        agg = aggregate_seeds(per_seed)
        agg["per_seed_rsum"] = [r["rsum"] for r in per_seed]
        results["aligners"][name] = agg
        for ratio in (section or {}).get("pairing_ratios") or []:
            runs = [unit(name, section, s, float(ratio)) for s in cfg.seeds]
            results.setdefault("pairing", {}).setdefault(name, {})[str(ratio)] = aggregate_seeds(runs)
    _link_embeddings(results, cfg, out)
    results["chance"] = views.chance()
    results["files"] = {"results": str(out / "results.json"), "report": str(out / "report_align.md")}
    if results["aligners"]:
        results["files"].update(plots(results, views, out))
    write_json(out / "results.json", results)
    report = format_results(results)
    for key, title in (("recall_plot", "Retrieval recall per aligner"), ("space_map", "Shared space")):
        if key in results["files"]:
            report += f"\n\n![{title}]({Path(results['files'][key]).name})"
    write_text_atomic(out / "report_align.md", report + "\n")
    return results


def _link_embeddings(results: dict[str, Any], cfg: Config, out: Path) -> None:
    """``out/embeddings/<aligner>/`` = the first seed's test embeddings (the inputs of ``alignfuse retrieval``)."""
    import shutil

    for name in results["aligners"]:
        src = out / "units" / name / f"seed{cfg.seeds[0]}" / "embeddings"
        if src.is_dir():
            dst = out / "embeddings" / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                shutil.copyfile(f, dst / f.name)


def format_results(results: dict[str, Any]) -> str:
    from experiments.reports.align import format_results as fmt

    return fmt(results)
