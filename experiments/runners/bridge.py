"""The bridge experiment: seed LLM connectors from an aligned space, train them (stage 1: captions; stage 2:
visual instructions with LoRA), compare with random init. This module only orchestrates.

Pipeline (``alignfuse run bridge_shapesworld``)::

    ShapesWorld ──frozen vision encoder (cached), grid pooled to vision.tokens──► image tokens
         ▼                                                    (experiments.bridge.features.prepare)
    seed map: aligner on image tokens ↔ MiniLM captions, text-only map into the LM's embeddings, scale
         ▼                                                    (experiments.bridge.seed.fit_seed_map)
    stage 1, per connector × init: MultimodalLM(frozen LM, connector, style tokens) on captions
         ▼                                                    (experiments.bridge.stages)
         (init stage1, for the qformer connector: a Q-Former aligner trained first on the image tokens and
          captions, BLIP-2's first stage; its query path + a new projection; experiments.qformer_bridge)
    stage 2, per stage2.inits: + LoRA adapter on generated dialogues (experiments.data.vqa)
         ▼
    results.json, report_bridge.md, bridge_loss_curves.png, projector/ (LLaVA), model/ (for `alignfuse ask`)

Evaluation (:mod:`experiments.bridge.evaluate`): caption NLL with image / no image / shuffled image and
the paired image gain, attribute accuracy of generated captions (+ other-scene control), distinct
example captions, hard-negative ranking; VQA exact match per question type with no-image,
shuffled-image and majority-answer controls, on seen and held-out phrasings.
Every training unit resumes from its ``out_dir/runs/<unit>/last.pt``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.connectors import build_connector
from align.export import export_llava_projector
from experiments.bridge import report
from experiments.bridge.config import Config, validate  # noqa: F401  (Config: the runner API)
from experiments.bridge.evaluate import evaluate_captions, evaluate_vqa
from experiments.bridge.features import BridgeData, prepare
from experiments.bridge.seed import SeedMap, fit_seed_map
from experiments.bridge.stages import (build_model, connector_inits, dialogue_set, save_model, train_stage1,
                                       train_stage2)
from experiments.config import dump, load_config
from experiments.data.vqa import majority_answers, make_dialogues, make_questions
from experiments.report import write_json, write_text_atomic

log = logging.getLogger(__name__)
format_results = report.format_results


def load(raw: dict, where: str = "config") -> Config:
    """Validate ``raw`` (a parsed YAML dict) into a :class:`Config`; every error names the key and the choices."""
    return validate(load_config(Config, raw, where), where)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dump(cfg)


def _stage1(cfg: Config, bd: BridgeData, seed_map: SeedMap | None, name: str, init: str, out_dir: Path
            ) -> tuple[dict[str, Any], Any]:
    key, unit = f"{name}/{init}", out_dir / "runs" / f"{name}-{init}"
    model, seed_info = build_model(cfg, bd, name, init, seed_map)
    e = cfg.eval
    log.info("[%s] step-0 evaluation", key)
    step0 = evaluate_captions(model.eval(), bd.eval_set, e.batch_size, e.max_new_tokens, e.n_examples,
                              controls=e.step0_controls)
    result, val0 = train_stage1(cfg, bd, model, unit)
    log.info("[%s] final evaluation", key)
    final = evaluate_captions(model.eval(), bd.eval_set, e.batch_size, e.max_new_tokens, e.n_examples)
    save_model(model, unit / "model", cfg, bd, {"init": init, "stage": 1})
    if model.kind == "xattn":
        model.connector.detach()  # the LM is shared by the next runs; stage 2 attaches again
    val_curve = [[0, val0]] + [[r["step"], r["val_caption_nll"]] for r in result.history if r["kind"] == "eval"]
    run = {"connector": name, "init": init, "seed_info": seed_info, "steps": result.steps,
           "train_seconds": round(result.train_seconds, 2), "n_trainable": result.n_trainable,
           **{f"{k}_step0": v for k, v in step0.items()}, **final, "val_caption_nll": val_curve[-1][1],
           "curves": {"train_loss": [[r["step"], r["loss"]] for r in result.history if r["kind"] == "train"],
                      "val_caption_nll": val_curve},
           "checkpoint_dir": str(unit)}
    return run, model


def _stage2(cfg: Config, bd: BridgeData, models: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Stage 1 only vs stage 1 + 2 on VQA, per init; the seeded (else first) stage-2 model goes to model/."""
    s = cfg.stage2
    name = s.connector or cfg.connectors[0]
    train_scenes = [bd.data.scenes[i] for i in bd.data.splits["train"]]
    dialogues, rows = make_dialogues(train_scenes, s.dialogues_per_scene, s.max_turns, seed=cfg.data.seed)
    test_idx = bd.data.splits["test"][: s.n_eval_scenes]
    scenes = [bd.data.scenes[i] for i in test_idx]
    images = torch.from_numpy(bd.tokens[test_idx])
    seen = make_questions(scenes, s.questions_per_type, False, seed=cfg.data.seed + 1)
    held = make_questions(scenes, s.questions_per_type, True, seed=cfg.data.seed + 2)
    majority = majority_answers(dialogues)
    out: dict[str, Any] = {"connector": name, "n_dialogues": len(dialogues), "n_eval_scenes": len(scenes),
                           "eval_indices": [int(i) for i in test_idx], "majority_answers": majority, "runs": {}}
    b = cfg.eval.batch_size
    for init in s.inits:
        model = models.get(f"{name}/{init}")
        if model is None:
            continue
        log.info("[stage 2 %s/%s] VQA before, LoRA training, VQA after", name, init)
        if model.kind == "xattn":
            model.connector.attach(model.llm)
        before = evaluate_vqa(model.eval(), images, seen, held, majority, b, s.n_examples, controls=False)
        unit = out_dir / "runs" / f"{name}-{init}-stage2"
        try:
            result = train_stage2(cfg, model, dialogue_set(cfg, bd, model, dialogues, rows), unit)
            after = evaluate_vqa(model.eval(), images, seen, held, majority, b, s.n_examples)
            save_model(model, unit / "model", cfg, bd, {"init": init, "stage": 2})
            if init == "seeded" or "seeded" not in s.inits:
                save_model(model, out_dir / "model", cfg, bd, {"init": init, "stage": 2})
                out["model_dir"] = str(out_dir / "model")
        finally:
            model.remove_lora()
        out["runs"][init] = {"stage1": before, "stage2": after, "steps": result.steps,
                             "train_seconds": round(result.train_seconds, 2), "n_trainable": result.n_trainable}
    return out


def _export_best(runs: dict[str, dict[str, Any]], models: dict[str, Any], bd: BridgeData, cfg: Config,
                 out_dir: Path, seed_map: SeedMap | None) -> dict[str, Any] | None:
    """The seeded LLaVA-type connector with the lowest caption NLL, in LLaVA's format; without one, the
    seed map itself as an (untrained) ``linear`` projector."""
    candidates = [k for k, r in runs.items() if r["init"] == "seeded" and models[k].connector.llava_type]
    extra = {"init": "seeded", "seeding": dump(cfg.seeding)}
    if candidates:
        best = min(candidates, key=lambda k: runs[k]["caption_nll"])
        connector, name = models[best].connector, runs[best]["connector"]
        extra.update(trained=True, caption_nll=runs[best]["caption_nll"])
    elif seed_map is not None:
        connector = build_connector("linear", bd.tokens.shape[-1], bd.llm.get_input_embeddings().embedding_dim)
        seed_map.seed(connector)
        name, extra["trained"] = "linear (the seed map, untrained)", False
    else:
        return None
    path = export_llava_projector(connector, out_dir / "projector", vision_encoder=bd.setup["vision_encoder"],
                                  llm=bd.llm_name, extra=extra)
    return {"connector": name, "path": str(path)}


def run(cfg: Config) -> dict[str, Any]:
    """Stage 1 for every connector × init, stage 2 for ``stage2.inits``; write results, report, plot, model."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bd = prepare(cfg)
    need_seed = "seeded" in cfg.inits
    seed_map = fit_seed_map(cfg, bd) if need_seed else None
    setup = {**bd.setup, **({"seed_map": seed_map.info} if seed_map else {})}
    runs: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []  # connector × init combinations that do not apply (e.g. stage1 for linear)
    try:
        for name in cfg.connectors:
            for init in cfg.inits:
                if init not in connector_inits(name):
                    why = f"connector {name!r} has no {init!r} init (it supports {', '.join(connector_inits(name))})"
                    log.info("=== %s/%s skipped: %s ===", name, init, why)
                    skipped.append({"run": f"{name}/{init}", "reason": why})
                    continue
                log.info("=== %s/%s ===", name, init)
                runs[f"{name}/{init}"], models[f"{name}/{init}"] = _stage1(cfg, bd, seed_map, name, init, out_dir)
        t_s2 = time.perf_counter()
        vqa = _stage2(cfg, bd, models, out_dir) if cfg.stage2.enabled else None
        results: dict[str, Any] = {"config": dump(cfg), "setup": setup, "runs": runs,
                                   "comparisons": report.comparisons(runs), "skipped": skipped}
        if vqa is not None:
            vqa["seconds"] = round(time.perf_counter() - t_s2, 1)
            results["vqa"] = vqa
        results["files"] = {"curves": str(report.plot(runs, out_dir / "bridge_loss_curves.png"))}
        exported = _export_best(runs, models, bd, cfg, out_dir, seed_map)
    finally:
        for m in models.values():
            m.detach()
    if exported:
        results["files"]["projector"] = exported["path"]
        results["exported_connector"] = exported["connector"]
    if vqa and vqa.get("model_dir"):
        results["files"]["model"] = vqa["model_dir"]
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out_dir / "results.json", results)
    write_text_atomic(out_dir / "report_bridge.md", report.markdown(results))
    results["files"]["results"] = str(out_dir / "results.json")
    results["files"]["report"] = str(out_dir / "report_bridge.md")
    return results
