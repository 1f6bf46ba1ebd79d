"""Zero-shot classification: DeViSE trained on the seen classes of labelled photos, scored on the unseen ones.

``alignfuse run fashion_mnist`` (the bundled config): frozen image features (``image_encoder`` pooled at
``image_size`` px, through the feature cache) are standardised on the seen-class training rows; DeViSE
(:mod:`align.devise`, options in ``devise``) maps them onto the ``text_encoder`` embeddings of the seen class
captions ("a photo of a <class>"), once per seed; every seed is scored on the test rows of every class with
:func:`align.devise.zero_shot_eval` (unseen classes among the unseen labels only, and, generalised, unseen and seen
classes among all labels). Beside it: a supervised upper bound (logistic regression trained on all classes, unseen
ones included, same features and per-class budget) and chance. The data must say which classes are unseen: a
loader with an ``unseen`` option whose data has a ``zeroshot`` split (``fashion_mnist``).

Each seed is a resumable unit under ``out_dir/units/devise/seed<N>``; ``results.json`` and ``report_zero_shot.md``
go to ``out_dir``. The methods live in :mod:`experiments.data.real.zero_shot` and :mod:`align.devise`.
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from experiments.config import ConfigError, DataSection, PositiveFloat, PositiveInt, RunConfig, TrainSection, \
    check_kwargs, dump, load_config
from experiments.views import check_data_section

log = logging.getLogger(__name__)


class Config(RunConfig):
    """The zero-shot experiment (module docstring). ``devise``: :class:`align.devise.DeViSE` options;
    ``upper_bound_c``: the inverse regularisation ``C`` of the upper bound's logistic regression."""

    experiment: Literal["zero_shot"] = "zero_shot"
    out_dir: str = "runs/fashion_mnist"
    data: DataSection = DataSection(name="fashion_mnist", train_per_class=300, test_per_class=200)
    image_encoder: str = "mobilenet_v2"
    text_encoder: str = "minilm"
    image_size: PositiveInt = 64
    devise: dict[str, Any] = Field(default_factory=lambda: {"margin": 0.1})
    upper_bound_c: PositiveFloat = 0.1
    train: TrainSection = TrainSection(max_steps=600, batch_size=256, lr=1e-3, weight_decay=0.05, warmup_steps=20,
                                       save_every=200)


def validate(cfg: Config, where: str = "config") -> Config:
    """Data (a loader with an ``unseen`` option), encoder names and DeViSE options; ConfigError on any problem."""
    from align.devise import DeViSE
    from experiments.data import DATASETS
    from experiments.encoders import ENCODERS

    if cfg.data.name in DATASETS and "unseen" not in inspect.signature(DATASETS[cfg.data.name]).parameters:
        raise ConfigError(f"{where}: data.name: {cfg.data.name!r} has no unseen classes (its loader takes no "
                          "'unseen' option); zero-shot data: fashion_mnist")
    check_data_section(cfg.data, where)
    for key in ("image_encoder", "text_encoder"):
        name = getattr(cfg, key)
        if name not in ENCODERS:
            raise ConfigError(f"{where}: {key}: unknown encoder {name!r}; known: {', '.join(ENCODERS.names())}")
    check_kwargs(DeViSE.__init__, cfg.devise, "devise", skip=("image_dim", "class_embeddings"))
    if cfg.devise.get("targets", "labels") != "labels":
        raise ConfigError(f"{where}: devise.targets must be 'labels' for zero-shot classification")
    return cfg


def load(raw: dict, where: str = "config") -> Config:
    """Validate a raw config dict (every key, value, encoder name and DeViSE option) into a :class:`Config`."""
    return validate(load_config(Config, raw, where), where)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dump(cfg)


def run(cfg: Config) -> dict[str, Any]:
    """DeViSE per seed (resumable units), the supervised upper bound and chance; results.json and
    report_zero_shot.md in ``out_dir``."""
    from experiments.data import load_dataset
    from experiments.data.real.zero_shot import GROUPS, chance, fit_devise, score_devise, supervised_upper_bound, \
        zero_shot_features
    from experiments.report import aggregate_seeds, write_json, write_text_atomic
    from experiments.units import Units, unit_key

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    opts = cfg.data.options()
    d = load_dataset(cfg.data.name, **opts)
    full = load_dataset(cfg.data.name, **{**opts, "unseen": ()})  # same rows, every class seen: the upper bound
    if "zeroshot" not in d.splits or not len(d.splits["zeroshot"]):
        raise ValueError(f"data {cfg.data.name!r} has no 'zeroshot' rows (splits: {sorted(d.splits)})")
    tr, te = d.splits["train"], np.concatenate([d.splits["test"], d.splits["zeroshot"]])
    rows = np.concatenate([*full.splits.values(), te])  # every kept row (the feature cache's key)
    feat, class_emb = zero_shot_features(d, rows, cfg.image_size, cfg.image_encoder, cfg.text_encoder,
                                         cfg.cache_root())
    t_feat = time.perf_counter() - t0
    x_tr, x_te = feat(tr), feat(te)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6  # standardised on the seen-class training rows
    x_tr, x_te = ((x_tr - mu) / sd).astype(np.float32), ((x_te - mu) / sd).astype(np.float32)
    y_te = d.labels[te]

    units = Units(out)
    per_seed = []
    for seed in cfg.seeds:
        name = f"devise/seed{seed}"
        key = unit_key(d.fingerprint, cfg.image_encoder, cfg.text_encoder, cfg.image_size, cfg.devise,
                       cfg.train.model_dump(), seed)
        res = units.result(name, key)
        if res is None:
            udir = units.start(name, key, {"method": "devise", "options": cfg.devise, "seed": seed})
            log.info("DeViSE, seed %d", seed)
            model = fit_devise(x_tr, d.labels[tr], class_emb, d.seen, cfg.train.trainer_config(seed, udir),
                               cfg.devise)
            res = score_devise(model, x_te, y_te, class_emb, d.seen)
            units.finish(name, key, res)
        per_seed.append(res)
    devise = {g: aggregate_seeds([r[g] for r in per_seed]) for g in GROUPS}
    sup_tr = full.splits["train"]
    upper = supervised_upper_bound(feat(sup_tr), full.labels[sup_tr], feat(te), y_te, d.unseen, cfg.upper_bound_c)
    results = {
        "data": {**cfg.data.model_dump(), "fingerprint": d.fingerprint},
        "classes": list(d.class_names), "unseen": [d.class_names[c] for c in d.unseen],
        "n": {"train_seen": int(len(tr)), "train_upper_bound": int(len(sup_tr)), "test_seen": int(len(d.splits["test"])),
              "test_unseen": int(len(d.splits["zeroshot"]))},
        "image_features": f"{cfg.image_encoder} pooled at {cfg.image_size} px", "text_encoder": cfg.text_encoder,
        "seeds": list(cfg.seeds), "devise": devise, "devise_per_seed": per_seed, "upper_bound": upper,
        "chance": chance(len(d.class_names), len(d.unseen)),
        "seconds": {"features": round(t_feat, 1), "total": round(time.perf_counter() - t0, 1)},
        "files": {"results": str(out / "results.json"), "report": str(out / "report_zero_shot.md")},
    }
    write_json(out / "results.json", results)
    write_text_atomic(out / "report_zero_shot.md", format_results(results) + "\n")
    return results


def format_results(results: dict[str, Any]) -> str:
    """The markdown table: DeViSE (mean ± std over seeds), the upper bound and chance, hit@k in %."""
    from experiments.report import fmt, markdown_table

    cols = [("unseen_only", "hit@1"), ("unseen", "hit@1"), ("unseen", "hit@5"), ("seen", "hit@1"), ("seen", "hit@5"),
            ("harmonic", "hit@1")]

    def cell(block: dict, g: str, k: str) -> str:
        v, sd = block.get(g, {}).get(k), block.get(g, {}).get(f"{k}_std")  # aggregate_seeds: k and k_std
        if v is None:
            return ""
        return fmt(100 * v, None if sd is None else 100 * sd)

    n, seeds = results["n"], results["seeds"]
    rows = [[f"DeViSE ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
             *(cell(results["devise"], g, k) for g, k in cols)],
            ["supervised upper bound (all classes seen)", *(cell(results["upper_bound"], g, k) for g, k in cols)],
            ["chance", *(cell(results["chance"], g, k) for g, k in cols)]]
    head = ["", f"unseen, among the {len(results['unseen'])} unseen: hit@1", "unseen, among all: hit@1", "hit@5",
            "seen, among all: hit@1", "hit@5", "harmonic hit@1"]
    return (f"Zero-shot on {results['data']['name']}: unseen {', '.join(results['unseen'])}; {n['train_seen']} "
            f"seen-class training photos ({n['train_upper_bound']} for the upper bound), {n['test_seen']} seen and "
            f"{n['test_unseen']} unseen test photos; {results['image_features']}, {results['text_encoder']} class "
            f"captions. hit@k in %.\n\n" + markdown_table(head, rows, align="l" + "r" * 6)
            + f"\n\n({results['seconds']['total']:.0f} s, {results['seconds']['features']:.0f} s of it loading photos "
              "and features)")
