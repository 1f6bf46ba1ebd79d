"""Tables, curves and the markdown report of a bridge run (from ``results.json`` content only)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from experiments.data.vqa import QUESTION_TYPES
from experiments.report import curve_panels, markdown_table


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pct(accuracy: float, named: float | None) -> str:
    """Attribute accuracy in %, "–" when the captions named no colour or shape at all."""
    return "–" if named == 0 else f"{accuracy * 100:.0f}"


def _gain(g: dict[str, Any] | None) -> str:
    return "–" if not g else f"{g['gain']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]"


def _steps_to_reach(curve: list[list[float]], level: float) -> int | None:
    return next((int(step) for step, value in curve if value <= level), None)


def comparisons(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per connector: seeded vs random (NLL gains and the step at which seeded reaches random's final val NLL) and,
    for a connector with a ``stage1`` run, ``"stage1"``: :func:`stage1_comparison`."""
    out: dict[str, dict[str, Any]] = {}
    for key, seeded in runs.items():
        name, init = key.split("/")
        random = runs.get(f"{name}/random")
        if init != "seeded" or random is None:
            continue
        reach = _steps_to_reach(seeded["curves"]["val_caption_nll"], random["val_caption_nll"])
        out[name] = {"step0_nll_gain": random["caption_nll_step0"] - seeded["caption_nll_step0"],
                     "final_nll_gain": random["caption_nll"] - seeded["caption_nll"],
                     "attribute_accuracy_gain": (seeded["attribute_accuracy"] - random["attribute_accuracy"]
                                                 if "attribute_accuracy" in seeded else None),
                     "random_final_val_nll": random["val_caption_nll"], "seeded_steps_to_reach_random_final": reach,
                     "fraction_of_random_steps": None if reach is None else reach / max(random["steps"], 1)}
    for key in runs:
        name, init = key.split("/")
        if init == "stage1" and f"{name}/random" in runs:
            out.setdefault(name, {})["stage1"] = stage1_comparison(runs, name)
    return out


def stage1_comparison(runs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The stage-1 init against ``name/random`` (issue #15's bridge goal): the first validation step at which
    ``name/stage1`` reaches random's final val NLL and its fraction of random's steps (goal: ≤ ⅓), NLL gains, and the
    image gain vs shuffled of each of ``name``'s rows (goal: stage1's is the largest)."""
    st, random = runs[f"{name}/stage1"], runs[f"{name}/random"]
    reach = _steps_to_reach(st["curves"]["val_caption_nll"], random["val_caption_nll"])
    frac = None if reach is None else reach / max(random["steps"], 1)
    gains = {k.split("/")[1]: r["gain_vs_shuffled"] for k, r in runs.items()
             if k.split("/")[0] == name and r.get("gain_vs_shuffled")}
    best = max(gains, key=lambda i: gains[i]["gain"]) if gains else None
    return {"random_final_val_nll": random["val_caption_nll"], "stage1_final_val_nll": st["val_caption_nll"],
            "stage1_steps_to_reach_random_final": reach, "random_steps": random["steps"],
            "fraction_of_random_steps": frac, "within_a_third": frac is not None and frac <= 1 / 3,
            "step0_nll_gain": random["caption_nll_step0"] - st["caption_nll_step0"],
            "final_nll_gain": random["caption_nll"] - st["caption_nll"],
            "image_gain_vs_shuffled": gains, "largest_image_gain": best,
            "stage1_has_largest_image_gain": best == "stage1",
            "stage1_aligner": {k: st.get("seed_info", {}).get(k) for k in ("steps", "train_seconds", "params",
                                                                           "loaded", "key")}}


def _attributes(r: dict[str, Any]) -> str:
    """"step 0 → final (other scene)" attribute accuracy, or "–" without scene metadata."""
    if "attribute_accuracy" not in r:
        return "–"
    return (f"{_pct(r['attribute_accuracy_step0'], r.get('named_per_caption_step0'))} → "
            f"{_pct(r['attribute_accuracy'], r.get('named_per_caption'))} ({r['attribute_accuracy_other_scene'] * 100:.0f})")


def format_results(results: dict[str, Any]) -> str:
    """Markdown tables: stage-1 captions (goals), seeded vs random, stage-2 VQA."""
    headers = ["run", "NLL step 0", "NLL final", "no image", "shuffled", "image gain vs shuffled [95% CI]",
               "attr acc % 0→final (other scene)", "distinct examples", "hard-neg % 0→final", "steps", "train s",
               "trainable"]
    rows = []
    for key, r in results["runs"].items():
        rows.append([key, _f(r["caption_nll_step0"]), _f(r["caption_nll"]), _f(r["no_image_nll"]),
                     _f(r["shuffled_image_nll"]), _gain(r.get("gain_vs_shuffled")),
                     _attributes(r), f"{r['distinct_examples']}/{r['n_examples']}",
                     f"{_f(r.get('hard_negative_ranking_step0'), 0)} → {r['hard_negative_ranking']:.0f}"
                     if "hard_negative_ranking" in r else "–",
                     r["steps"], _f(r["train_seconds"], 0), f"{r['n_trainable']:,}"])
    text = markdown_table(headers, rows)
    comp = {n: c for n, c in (results.get("comparisons") or {}).items() if "final_nll_gain" in c}
    if comp:
        text += "\n\n" + markdown_table(
            ["connector", "step-0 NLL gain (random − seeded)", "final NLL gain", "attr acc gain (points)",
             "random final val NLL", "seeded steps to reach it"],
            [[n, _f(c["step0_nll_gain"]), _f(c["final_nll_gain"]),
              "–" if c["attribute_accuracy_gain"] is None else _f(c["attribute_accuracy_gain"] * 100, 0),
              _f(c["random_final_val_nll"]), _f(c["seeded_steps_to_reach_random_final"])] for n, c in comp.items()])
    stage1 = {n: c["stage1"] for n, c in (results.get("comparisons") or {}).items() if "stage1" in c}
    if stage1:
        text += "\n\n" + format_stage1(stage1)
    if results.get("skipped"):
        text += "\n\nNot run (the init does not apply): " + "; ".join(
            f"`{s['run']}` ({s['reason']})" for s in results["skipped"]) + "."
    if results.get("vqa"):
        text += "\n\n" + format_vqa(results["vqa"])
    return text


def format_stage1(stage1: dict[str, dict[str, Any]]) -> str:
    """The stage-1 (BLIP-2 first stage) init against random, per connector: :func:`stage1_comparison`."""
    rows = []
    for n, c in stage1.items():
        reach = c["stage1_steps_to_reach_random_final"]
        gains = ", ".join(f"{i} {g['gain']:.3f}" for i, g in c["image_gain_vs_shuffled"].items())
        a = c["stage1_aligner"]
        rows.append([n, _f(c["random_final_val_nll"]), _f(c["stage1_final_val_nll"]),
                     "not reached" if reach is None else f"{reach} of {c['random_steps']} "
                                                         f"({c['fraction_of_random_steps']:.2f})",
                     "yes" if c["within_a_third"] else "no", gains or "–", c["largest_image_gain"] or "–",
                     f"{a.get('steps')} steps, {_f(a.get('train_seconds'), 0)} s"
                     f"{' (cached)' if a.get('loaded') else ''}, {a.get('params') or 0:,} params"])
    return markdown_table(["connector", "random final val NLL", "stage1 final val NLL",
                           "stage1 steps to reach it (fraction)", "≤ ⅓ of random's steps", "image gain vs shuffled",
                           "largest gain", "stage-1 aligner"], rows)


def format_vqa(vqa: dict[str, Any]) -> str:
    """Exact-match accuracy (%) per question type: stage 1 only vs 1 + 2, seeded vs random, with controls."""
    headers = ["model", "eval", *QUESTION_TYPES, "overall"]
    rows = []
    for init, r in vqa["runs"].items():
        for stage in ("stage1", "stage2"):
            res = r[stage]
            label = f"{vqa['connector']}/{init} {'stage 1 only' if stage == 'stage1' else 'stage 1+2'}"
            for ev, title in (("image", "image"), ("none_image", "no image"), ("shuffled_image", "shuffled image"),
                              ("held_out_phrasing", "held-out phrasings")):
                if stage == "stage1" and ev != "image":
                    continue
                rows.append([label, title, *(_f(res[ev].get(t), 0) for t in QUESTION_TYPES),
                             _f(res[ev]["overall"], 0)])
    first = next(iter(vqa["runs"].values()), None)
    if first:
        rows.append(["majority answer per type", "-", *(_f(first["stage2"]["majority"].get(t), 0)
                                                         for t in QUESTION_TYPES),
                     _f(first["stage2"]["majority"]["overall"], 0)])
    n = first["stage2"]["n_questions"] if first else {}
    return (f"VQA on {vqa['n_eval_scenes']} held-out scenes ({n.get('seen', 0)} questions with training phrasings, "
            f"{n.get('held_out_phrasing', 0)} with held-out phrasings), exact match %:\n\n"
            + markdown_table(headers, rows))


def plot(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per connector: validation (solid) and training (dotted) caption NLL, seeded vs random."""
    panels: dict[str, dict[str, tuple[list, list]]] = {}
    styles = {}
    for key, r in runs.items():
        name, init = key.split("/")
        for label, curve, style in (("val", r["curves"]["val_caption_nll"], "-"),
                                    ("train", r["curves"]["train_loss"], ":")):
            if curve:
                line = f"{init} {label}"
                panels.setdefault(name, {})[line] = ([c[0] for c in curve], [c[1] for c in curve])
                styles[line] = style
    return curve_panels(path, panels, xlabel="optimiser step", ylabel="caption NLL per token (nats)",
                        title="ShapesWorld captioning: connector inits", styles=styles,
                        colours={f"{i} {s}": c for i, c in (("seeded", "tab:blue"), ("random", "tab:red"),
                                                            ("stage1", "tab:green")) for s in ("val", "train")})


def markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = ["# Bridge: aligned-space seeding of LLM connectors (ShapesWorld)", "",
             f"LLM: `{setup.get('llm')}`; vision: `{setup.get('vision_encoder')}` grid {setup.get('grid_shape')} "
             f"→ image tokens {setup.get('image_tokens')}.", ""]
    if "seed_map" in setup:
        lines += [f"Seed map: `{setup['seed_map']}`", ""]
    lines += ["NLL: nats per caption token on held-out test images (eos included); attribute accuracy: % of named "
              "colours/shapes present in the scene (control: checked against another scene); distinct examples: "
              "different captions among the example images; image gain vs shuffled: shuffled-image NLL minus image "
              "NLL, paired bootstrap 95% interval over captions.", "", format_results(results), "",
              "![loss curves](bridge_loss_curves.png)", ""]
    for key, r in results["runs"].items():  # grid_tags: what the LM is shown, against the scenes
        if "layout_count_exact" in r:
            lines.append(f"- **{key}** shows the LM {r['layout_cells_per_image']:.1f} cells per image; object count "
                         f"exact on {100 * r['layout_count_exact']:.0f} % of the images; the colour / shape of the "
                         f"nearest object named in {100 * r['layout_colour_accuracy']:.0f} % / "
                         f"{100 * r['layout_shape_accuracy']:.0f} % of the cells.")
    lines += ["", "## Samples", ""]
    for key, r in results["runs"].items():
        for s in r["samples"][:3]:
            lines.append(f"- **{key}**: `{s['generated']}` (a reference: _{s['reference']}_)")
    for init, r in (results.get("vqa") or {}).get("runs", {}).items():
        for ex in r["stage2"]["examples"][:5]:
            lines.append(f"- **VQA {init}**: {ex['question']} → `{ex['answer']}` (truth: {ex['truth']})")
    lines += ["", f"Total time: {results.get('total_seconds')} s.", ""]
    return "\n".join(lines)
