"""``alignfuse demo``: the whole toolkit on the embedded ShapesWorld data, in one report.

Runs the aligner comparison, the fusion comparison and the LLM bridge (seeded vs random
connector) through their runners with small settings (``full=True``: the bundled configs'
heavier settings), then writes into ``out_dir``:

* ``results.json`` — ``alignment`` / ``fusion`` / ``bridge`` objects (schema in the README);
* ``report.md`` — tables and pictures (PNG, linked relatively);
* ``mm_projector.bin`` + ``mm_projector_config.json`` — the best seeded connector, LLaVA format.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Small settings: the demo finishes within ~10 minutes on a 2-core CPU with an empty feature cache.
DEMO_ALIGN = {
    # overrides of the bundled align_shapesworld.yaml. No held-out combinations here, so all three parts share one
    # dataset and one feature cache entry (the bundled config, run by --full, holds two out for DeViSE's zero-shot test)
    "data": {"n_scenes": 1500, "max_eval_images": 150, "holdout": []},
    "seeds": [0],
    "train": {"max_steps": 150, "warmup_steps": 10},
    # a part section selects parts of the bundled config; each part's options merge onto the bundled ones
    "aligners": {"cca": {}, "cycle_ae": {"pairing_ratios": []}, "devise": {}, "clip": {},
                 "gnn": {"embed_dim": 128, "hidden": 128, "train": {"max_steps": 100, "batch_size": 128}}},
}
DEMO_FUSION: dict[str, Any] = {
    "data": {"n_scenes": 1500},
    "seeds": [0],
    "tasks": ["nearest_colour", "largest_shape"],
    # a subset of the runner's strategies, with their default options
    # (feature/cross_attention, ~40 s here, runs in `alignfuse run fusion_shapesworld` and --full)
    "strategies": ["unimodal", "data/channel_stack", "feature/concat", "feature/gated", "feature/lmf",
                   "decision/mean", "decision/stacking"],
    "train": {"max_steps": 150},
    "robustness": {"rates": [0.0, 0.5, 1.0]},
}
DEMO_BRIDGE: dict[str, Any] = {
    "data": {"n_scenes": 1500},
    # grid_tags (the bundled config's first connector): for each object-like cell of the 8x8 grid its coordinates,
    # colour and shape as the LM's own words, scored by a ridge regression on the aligned space; the LM can then
    # say which colour goes with which shape, count and compare positions (`alignfuse run bridge_shapesworld`
    # compares all connectors)
    "connectors": ["grid_tags"],
    "inits": ["seeded", "random"],
    "train": {"max_steps": 16, "eval_every": 8},
    # the step-0 evaluation without its controls: caption NLL and the generated captions' attribute accuracy
    "eval": {"n_eval_images": 16, "captions_per_image": 2, "n_val_captions": 16, "step0_controls": False},
    # stage 2 for the seeded start only (a LoRA step: 1.6 s on 2 cores with bf16 matmuls, 2.6 s in float32, which
    # is what keeps this at 60 steps; on 48 held-out scenes 60 steps answered 69 % of the questions and 150 steps 79 %)
    "stage2": {"connector": "grid_tags", "inits": ["seeded"], "n_eval_scenes": 12, "train": {"max_steps": 60}},
}


def _runner_config(module, overrides: dict[str, Any] | None, out_dir: Path, full: bool, bundled: str):
    """The bundled config (``full``) or the bundled config overlaid with the small demo settings."""
    from experiments.config import config_path, read_yaml

    raw = read_yaml(config_path(bundled))
    if not full and overrides:
        defaults = module.Config().model_dump() if hasattr(module.Config, "model_dump") else {}
        raw = _deep_update(raw, overrides, defaults)
    raw["out_dir"] = str(out_dir)
    return module.load(raw, where=f"demo:{bundled}")


PART_SECTIONS = ("aligners", "strategies")  # sections that select parts by name


def _deep_update(base: dict, new: dict, defaults: dict | None = None) -> dict:
    """``new`` merged onto ``base``. A part section (``aligners``, ``strategies``) selects parts: a list of names
    keeps those parts with their options in ``base`` (or the runner's ``defaults``); a mapping merges each part's
    options onto them. Other sections merge key by key."""
    out = dict(base)
    for k, v in new.items():
        if k in PART_SECTIONS:
            known = out.get(k) or (defaults or {}).get(k) or {}
            if isinstance(known, list):  # a selection not yet resolved (the demo's own settings)
                known = {name: {} for name in known}
            names = list(v)
            missing = [name for name in names if name not in known]
            if missing:
                raise KeyError(f"demo: {k} {missing} are not in the bundled config's or the runner's {k}")
            extra = v if isinstance(v, dict) else {}
            out[k] = {name: _deep_update(dict(known[name] or {}), extra.get(name) or {}) for name in names}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def run_demo(out_dir: str | Path, full: bool = False, parts: tuple[str, ...] = ("align", "fusion", "bridge"),
             overrides: dict[str, dict] | None = None) -> dict[str, Any]:
    """Run the demo; returns the ``results.json`` content. ``overrides`` (per part) shrink it further (tests)."""
    from experiments.report import write_json
    from experiments.runners import runner_module

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    settings = {"align": DEMO_ALIGN, "fusion": DEMO_FUSION, "bridge": DEMO_BRIDGE}
    bundled = {"align": "align_shapesworld", "fusion": "fusion_shapesworld", "bridge": "bridge_shapesworld"}
    raw_results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for part in parts:
        mod = runner_module(part)
        part_settings = _deep_update(settings[part], (overrides or {}).get(part, {}))
        cfg = _runner_config(mod, part_settings, out / part, full, bundled[part])
        log.info("demo: %s (%s settings)", part, "full" if full else "demo")
        t0 = time.perf_counter()
        raw_results[part] = mod.run(cfg)
        timings[part] = time.perf_counter() - t0
        log.info("demo: %s done in %.0f s", part, timings[part])
    results = {
        "alignment": _alignment_summary(raw_results.get("align")),
        "fusion": _fusion_summary(raw_results.get("fusion")),
        "bridge": _bridge_summary(raw_results.get("bridge")),
        "seconds": {**{k: round(v, 1) for k, v in timings.items()},
                    "total": round(time.perf_counter() - t_start, 1)},
        "settings": "full" if full else "demo",
    }
    projector = _copy_projector(raw_results.get("bridge"), out)
    if projector:
        results["mm_projector"] = projector
    pictures = _pictures(raw_results, out)
    write_json(out / "results.json", results)
    (out / "report.md").write_text(format_report(results, raw_results, pictures, out))
    return results


# ------------------------------------------------------------------------------------ summaries

RETRIEVAL_KEYS = ("R@1", "R@5", "R@10", "median_rank", "mean_rank")


def _alignment_summary(res: dict[str, Any] | None) -> dict[str, Any]:
    if not res:
        return {}
    out = {}
    for name, r in res["aligners"].items():
        out[name] = {
            "image_to_text": {k: r["image_to_text"][k] for k in RETRIEVAL_KEYS},
            "text_to_image": {k: r["text_to_image"][k] for k in RETRIEVAL_KEYS},
            "rsum": r["rsum"],
            "hard_negative_accuracy": r.get("hard_negative_accuracy"),
            "n_test_images": int(r["n_test_images"]),
            "train_seconds": r["train_seconds"],
        }
    return out


def _fusion_summary(res: dict[str, Any] | None) -> dict[str, Any]:
    if not res:
        return {}
    out: dict[str, Any] = {}
    for task, strategies in res["tasks"].items():
        out[task] = {name: {"accuracy": r["accuracy"], "params": r["params"],
                            "missing_modality": dict(r.get("missing_modality", {}))}
                     for name, r in strategies.items()}
    return out


BRIDGE_KEYS = ("caption_nll_step0", "caption_nll", "no_image_nll", "shuffled_image_nll", "attribute_accuracy_step0",
               "attribute_accuracy",
               "attribute_accuracy_other_scene", "distinct_examples", "n_examples", "gain_vs_shuffled",
               "hard_negative_ranking")


def _bridge_summary(res: dict[str, Any] | None) -> dict[str, Any]:
    """Per stage-1 run: the caption goals' numbers; ``vqa``: accuracy per question type and control."""
    if not res:
        return {}
    out: dict[str, Any] = {name: {k: r[k] for k in BRIDGE_KEYS if k in r}
                           for name, r in res.get("runs", {}).items() if isinstance(r, dict) and "caption_nll" in r}
    if res.get("vqa"):
        out["vqa"] = {init: {stage: {ev: r[stage][ev] for ev in ("image", "none_image", "shuffled_image", "majority",
                                                                 "held_out_phrasing") if ev in r[stage]}
                             for stage in ("stage1", "stage2")} for init, r in res["vqa"]["runs"].items()}
        if res["vqa"].get("model_dir"):
            out["model_dir"] = res["vqa"]["model_dir"]
    return out


def _copy_projector(res: dict[str, Any] | None, out: Path) -> dict[str, str] | None:
    """Copy the bridge's exported LLaVA projector (``mm_projector.bin`` + sidecar) to the demo's top level."""
    exported = (res or {}).get("files", {}).get("projector")
    if not exported:
        return None
    folder = Path(exported) if Path(exported).is_dir() else Path(exported).parent
    if not (folder / "mm_projector.bin").exists():
        return None
    copied = {}
    for f in sorted(folder.iterdir()):
        if f.is_file():
            shutil.copyfile(f, out / f.name)
            copied[f.stem] = f.name
    copied["connector"] = res.get("exported_connector", "")
    return copied


# ------------------------------------------------------------------------------------ report


def _pictures(raw: dict[str, Any], out: Path) -> dict[str, str]:
    """Relative paths of every picture the report links; the example grids are drawn here."""
    pics: dict[str, str] = {}
    for part, res in raw.items():
        files = (res or {}).get("files", {})
        items = files.items() if isinstance(files, dict) else ((Path(f).stem, f) for f in files)
        for key, path in items:
            path = Path(path).resolve()
            if path.suffix == ".png" and path.exists() and path.is_relative_to(out.resolve()):
                pics[f"{part}/{key}"] = str(path.relative_to(out.resolve()))
    for key, draw in (("retrieval_examples", _retrieval_grid), ("caption_examples", _caption_grid)):
        path = draw(raw, out)
        if path:
            pics[key] = path
    return pics


def _load_world(d: dict[str, Any]):
    """The ShapesWorld of a run's data section (its ShapesWorld options; the others are view options)."""
    import dataclasses

    from experiments.data import ShapesWorldConfig, load_shapesworld

    fields = {f.name for f in dataclasses.fields(ShapesWorldConfig)}
    opts = {k: v for k, v in d.items() if k in fields}
    opts["holdout"] = [tuple(h) for h in opts.get("holdout", [])]
    return load_shapesworld(**opts)


def _retrieval_grid(raw: dict[str, Any], out: Path, n: int = 8) -> str | None:
    """Test images with their top-3 retrieved captions from the best aligner (✓ marks a true caption)."""
    from experiments.report import image_grid

    align = raw.get("align")
    if not align or not align.get("aligners"):
        return None
    best = max(align["aligners"], key=lambda k: align["aligners"][k]["rsum"])
    emb = out / "align" / "embeddings" / best
    if not (emb / "image_emb.npy").exists():
        return None
    img, txt, t2i = (np.load(emb / f"{f}.npy") for f in ("image_emb", "text_emb", "text_to_image"))
    ds = _load_world(align["data"])
    test_idx = np.asarray(ds.splits["test"])[: len(img)]
    captions = [c for i in test_idx for c in ds.captions[i]]
    img_n = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt_n = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    rows = list(range(min(n, len(img))))
    lines = [[("✓ " if t2i[j] == r else "✗ ") + captions[j] for j in np.argsort(-(txt_n @ img_n[r]))[:3]]
             for r in rows]
    path = image_grid(out / "examples_retrieval.png", [ds.images[i] for i in test_idx[rows]], lines,
                      title=f"held-out test images: top-3 retrieved captions ({best})")
    return str(path.relative_to(out))


def _caption_grid(raw: dict[str, Any], out: Path) -> str | None:
    """The bridge's held-out images with the LLM's generated captions, seeded vs random connector; also
    draws ``examples_vqa.png`` (stage-2 questions and answers) when the run has stage 2."""
    from experiments.data.vqa import normalise_answer
    from experiments.report import image_grid

    bridge = raw.get("bridge")
    if not bridge or not bridge.get("runs"):
        return None
    runs = bridge["runs"]
    seeded = next((k for k in runs if k.endswith("/seeded")), None)
    random_ = next((k for k in runs if k.endswith("/random")), None)
    n = min(len(runs[k].get("samples", [])) for k in (seeded, random_) if k) if seeded or random_ else 0
    if not n:
        return None
    ds = _load_world({**bridge["config"]["data"], "holdout": []})
    test_idx = np.asarray(ds.splits["test"])
    lines = []
    for i in range(n):
        row = [f"true: {runs[seeded or random_]['samples'][i]['reference']}"]
        for k in (seeded, random_):
            if k:
                row.append(f"{k}: {runs[k]['samples'][i]['generated'].strip()}")
        lines.append(row)
    path = image_grid(out / "examples_captions.png", [ds.images[i] for i in test_idx[:n]], lines,
                      title="held-out images: captions generated by the frozen LLM through the trained connector")
    vqa = bridge.get("vqa") or {}
    run = (vqa.get("runs") or {}).get("seeded") or next(iter((vqa.get("runs") or {}).values()), None)
    if run:
        examples = run["stage2"]["examples"]
        image_grid(out / "examples_vqa.png", [ds.images[vqa["eval_indices"][e["scene"]]] for e in examples],
                   [[f"Q: {e['question']}", f"A: {e['answer']} "
                     f"({'✓' if normalise_answer(e['answer']) == e['truth'] else 'truth: ' + e['truth']})"]
                    for e in examples], title="held-out images: questions answered after stage 2 (LoRA)")
    return str(path.relative_to(out))


def format_report(results: dict[str, Any], raw: dict[str, Any], pictures: dict[str, str], out: Path) -> str:
    lines = ["# alignfuse demo report", "",
             f"Settings: **{results['settings']}**; wall time {results['seconds']['total']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items() if k != 'total')}).", ""]
    if raw.get("align"):
        from experiments.runners.align import format_results as fmt_align

        a = raw["align"]
        lines += ["## 1. Alignment: retrieval on held-out ShapesWorld images", "",
                  f"Inputs: {a['data']['inputs']['image']} ↔ {a['data']['inputs']['text']}; "
                  f"{a['data']['n_scenes']} scenes; recalls in %; hard-negative accuracy = share of (image, "
                  "caption, minimally edited false caption) triples where the true caption scores higher.", "",
                  fmt_align(a), ""]
        for key, title in (("align/recall_plot", "Recall per aligner"), ("align/space_map", "Shared space")):
            if key in pictures:
                lines += [f"![{title}]({pictures[key]})", ""]
        if "retrieval_examples" in pictures:
            lines += [f"![Retrieved captions]({pictures['retrieval_examples']})", ""]
    if raw.get("fusion"):
        from experiments.runners.fusion import format_results as fmt_fusion

        lines += ["## 2. Fusion: classification from RGB, depth and text", "", fmt_fusion(raw["fusion"]), ""]
        for key, rel in pictures.items():
            if key.startswith("fusion/"):
                lines += [f"![{key}]({rel})", ""]
    if raw.get("bridge"):
        from experiments.runners.bridge import format_results as fmt_bridge

        lines += ["## 3. LLM bridge: connector seeded from the aligned space vs random init", "",
                  fmt_bridge(raw["bridge"]), ""]
        for key, rel in pictures.items():
            if key.startswith("bridge/"):
                lines += [f"![{key}]({rel})", ""]
        if "caption_examples" in pictures:
            lines += [f"![Generated captions]({pictures['caption_examples']})", ""]
        if (out / "examples_vqa.png").is_file() and raw["bridge"].get("vqa"):
            lines += ["![Questions and answers](examples_vqa.png)", ""]
        if results.get("bridge", {}).get("model_dir"):
            lines += [f"Ask the trained model: `alignfuse ask {out} --image scene.png \"What colour is the star?\"`.", ""]
        if results.get("mm_projector"):
            lines += [f"Exported `{results['mm_projector']['mm_projector']}` (LLaVA format) with sidecar "
                      f"`{results['mm_projector'].get('mm_projector_config', '')}`.", ""]
    return "\n".join(lines) + "\n"
