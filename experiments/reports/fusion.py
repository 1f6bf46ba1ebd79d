"""The fusion comparison's report: per-seed aggregation, gains and paired tests, tables, verdicts, the prose of
``report_fusion.md`` and the robustness plots."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import fusion
from experiments.classify import CORRUPTIONS
from experiments.report import mean_std

UNIMODAL = "unimodal"
IGNORED_PP = 2.0  # a strategy losing less than this when a modality is missing is reported as not using it


def aggregate_entry(runs: Sequence[dict[str, Any]], seeds: Sequence[int], level: str, kind: str,
                    task: Any) -> dict[str, Any]:
    """Mean and std over seeds; per-seed values kept under ``per_seed``."""
    out: dict[str, Any] = {"level": level, "inputs": kind}
    for key in ("accuracy", "macro_f1", "val_accuracy", "train_seconds", "latency_ms", "throughput_ms"):
        out[key], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    out["params"] = int(runs[0]["params"])
    out["fusion_params"] = int(runs[0]["fusion_params"])
    out["steps"] = int(runs[0]["steps"])
    out["missing_modality"], out["missing_modality_std"] = {}, {}
    for m in task.modalities:
        out["missing_modality"][m], out["missing_modality_std"][m] = mean_std(
            [r["missing_modality"][m] for r in runs])
    rob: dict[str, Any] = {"rates": runs[0]["robustness"]["rates"]}
    for how in CORRUPTIONS:
        stack = {m: np.asarray([r["robustness"][how][m] for r in runs], dtype=float) for m in task.modalities}
        rob[how] = {m: a.mean(0).tolist() for m, a in stack.items()}
        rob[f"{how}_std"] = {m: (a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])).tolist()
                             for m, a in stack.items()}
    out["robustness"] = rob
    out["per_seed"] = {"seeds": list(seeds), "accuracy": [r["accuracy"] for r in runs],
                       "macro_f1": [r["macro_f1"] for r in runs], "val_accuracy": [r["val_accuracy"] for r in runs]}
    return out


def _paired_tests(entries: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, float]]:
    """Reference = highest mean validation accuracy; paired t-tests of every entry's per-seed test accuracies
    against it (:func:`experiments.stats.paired_pvalues`)."""
    from experiments.stats import paired_pvalues

    if not entries:
        return None, {}
    ref = max(entries, key=lambda n: (entries[n]["val_accuracy"], entries[n]["accuracy"]))
    return ref, paired_pvalues({n: e["per_seed"]["accuracy"] for n, e in entries.items()}, ref)


def summarise_task(entries: dict[str, dict[str, Any]], task: Any) -> dict[str, Any]:
    """Gains, paired tests and the level comparison of one task (added to entries and returned as info)."""
    uni = {n: e for n, e in entries.items() if e["level"] == UNIMODAL}
    best_uni = max(uni, key=lambda n: uni[n]["val_accuracy"]) if uni else None
    ref, pvals = _paired_tests(entries)
    for name, e in entries.items():
        e["gain_over_best_unimodal"] = e["accuracy"] - entries[best_uni]["accuracy"] if best_uni else math.nan
        e["p_value_vs_best"] = pvals.get(name, math.nan)
    by_level = {lvl: {n: e for n, e in entries.items() if e["level"] == lvl} for lvl in fusion.LEVELS}
    best = {lvl: (max(es, key=lambda n: es[n]["accuracy"]) if es else None) for lvl, es in by_level.items()}
    best_early = [n for n in (best["data"], best["feature"]) if n is not None]
    top_early = max(best_early, key=lambda n: entries[n]["accuracy"]) if best_early else None
    dec = by_level["decision"]
    beats = None
    if top_early and dec:
        beats = all(entries[top_early]["accuracy"] > e["accuracy"] for e in dec.values())
    return {"best_unimodal": best_uni, "reference": ref, "best_per_level": best,
            "best_early_or_intermediate": top_early,
            "early_or_intermediate_beats_every_decision_level": beats}



def robustness_plots(out_dir: Path, t: str, entries: Mapping[str, dict[str, Any]], task: Any) -> list[Path]:
    """``fusion_robustness_<t>.png``: accuracy when a random one of the modalities is missing for a fraction
    of the test samples (the mean of the per-modality drop curves, which is its expectation); plus one plot
    per (corruption, modality): ``fusion_robustness_<t>_<corruption>-<modality>.png``."""
    from experiments.report import curves

    styles = {n: "--" if e["level"] == UNIMODAL else (":" if e["level"] == "decision" else "-")
              for n, e in entries.items()}
    paths = []
    mean_lines = {}
    for n, e in entries.items():
        rob = e["robustness"]
        mean_lines[n] = (rob["rates"], np.mean([rob["drop"][m] for m in task.modalities], axis=0).tolist())
    paths.append(curves(out_dir / f"fusion_robustness_{t}.png", mean_lines,
                        xlabel="test samples missing one modality (chosen at random) [%]", ylabel="accuracy [%]",
                        title=f"{t}: missing modality", styles=styles))
    for how in CORRUPTIONS:
        for m in task.modalities:
            lines = {n: (e["robustness"]["rates"], e["robustness"][how][m]) for n, e in entries.items()}
            xlabel = f"test samples with {m} " + ("missing" if how == "drop" else "noised") + " [%]"
            paths.append(curves(out_dir / f"fusion_robustness_{t}_{how}-{m}.png", lines, xlabel=xlabel,
                                ylabel="accuracy [%]", title=f"{t}: {m} {'dropped' if how == 'drop' else 'noised'}",
                                styles=styles))
    return paths


def _p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def _signed(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.1f}"


def task_tables(t: str, entries: Mapping[str, dict[str, Any]], info: Mapping[str, Any]) -> str:
    """Markdown tables of one task: accuracy, cost, missing modality and robustness at the largest rate."""
    from experiments.report import fmt, markdown_table

    ref = info.get("reference")
    order = sorted(entries, key=lambda n: -entries[n]["accuracy"])
    rows = []
    for n in order:
        e = entries[n]
        seeds = " / ".join(f"{a:.1f}" for a in e["per_seed"]["accuracy"])
        rows.append([f"**{n}**" if n == ref else n, fmt(e["accuracy"], e["accuracy_std"]),
                     fmt(e["macro_f1"], e["macro_f1_std"]), _signed(e["gain_over_best_unimodal"]),
                     "ref" if n == ref else _p(e["p_value_vs_best"]), seeds, fmt(e["val_accuracy"])])
    parts = [markdown_table(["strategy", "accuracy %", "macro-F1 %", "gain vs best unimodal (pp)",
                             "p vs ref", "per-seed accuracy", "val acc %"], rows)]

    rows = [[n, e["inputs"], f"{e['params']:,}", f"{e['fusion_params']:,}", fmt(e["train_seconds"], digits=1),
             f"{e['latency_ms']:.2f}", f"{e['throughput_ms']:.3f}"] for n, e in ((n, entries[n]) for n in order)]
    parts.append(markdown_table(["strategy", "inputs", "params (whole model)", "fusion params", "train s",
                                 "latency ms/sample (batch 1)", "ms/sample (batch 512)"], rows))

    mods = list(info["modalities"])
    rob = next(iter(entries.values()))["robustness"]
    top = rob["rates"][-1]
    rows = []
    for n in order:
        e = entries[n]
        rows.append([n, fmt(e["accuracy"])]
                    + [fmt(e["missing_modality"][m]) for m in mods]
                    + [fmt(e["robustness"]["noise"][m][-1]) for m in mods])
    parts.append(markdown_table(["strategy", "clean"] + [f"{m} missing" for m in mods]
                                + [f"{m} noised ({top:.0f} %)" for m in mods], rows))
    return "\n\n".join(parts)


def _verdict(t: str, entries: Mapping[str, dict[str, Any]], info: Mapping[str, Any]) -> list[str]:
    from experiments.report import fmt

    lines = []
    best = info["best_per_level"]
    fmt_e = lambda n: f"`{n}` ({fmt(entries[n]['accuracy'], entries[n]['accuracy_std'])} %)"  # noqa: E731
    for lvl in fusion.LEVELS:
        if best.get(lvl):
            lines.append(f"best {lvl}-level: {fmt_e(best[lvl])}")
    if info.get("best_unimodal"):
        lines.append(f"best unimodal (by validation accuracy): {fmt_e(info['best_unimodal'])}")
    uni = info.get("best_unimodal")
    if best.get("feature") and best.get("decision"):
        f, d = entries[best["feature"]]["accuracy"], entries[best["decision"]]["accuracy"]
        extra = f"; best feature-level − best unimodal: {f - entries[uni]['accuracy']:+.1f} pp" if uni else ""
        lines.append(f"best feature-level − best decision-level: {f - d:+.1f} pp{extra}")
    beats = info.get("early_or_intermediate_beats_every_decision_level")
    top = info.get("best_early_or_intermediate")
    if beats is not None:
        dec = max((n for n, e in entries.items() if e["level"] == "decision"), key=lambda n: entries[n]["accuracy"])
        if beats:
            lines.append(f"**{top} beats every decision-level strategy** (best decision-level: {fmt_e(dec)}; "
                         f"difference {entries[top]['accuracy'] - entries[dec]['accuracy']:+.1f} pp in mean "
                         "test accuracy).")
        else:
            lines.append(f"no data- or feature-level strategy beats every decision-level one: the best, {fmt_e(top)}, "
                         f"does not beat {fmt_e(dec)}.")
    for m in info["modalities"]:
        idle = [n for n, e in entries.items() if e["level"] != UNIMODAL
                and m in e["missing_modality"] and e["accuracy"] - e["missing_modality"][m] < IGNORED_PP]
        if idle:
            lines.append(f"lose less than {IGNORED_PP:g} pp when `{m}` is missing for every test sample (so they "
                         f"barely use it): {', '.join(f'`{n}`' for n in idle)}")
    return lines


def report(results: Mapping[str, Any], out_dir: Path) -> str:
    cfg = results["config"]
    seeds = cfg["seeds"]
    tr = cfg["train"]
    shapesworld_notes = [
        "* **Inputs.** image: frozen ImageNet MobileNetV2 features; depth: **the same RGB network on the depth map "
        "replicated to 3 channels**; text: frozen MiniLM embedding of the noisy caption. `pooled` = global average "
        "[1280]; `grid` = the 4x4 feature map as 16 tokens, given only to "
        f"{', '.join(f'`{n}`' for n in cfg['grid_tokens'])}. The other feature-level operators average tokens "
        "before fusing, so they get the pooled vector: **where** an object is is gone before they fuse, and "
        "binding a colour to the nearest position must come from whatever the pooled vector still encodes.",
        f"* **Data level.** `data/channel_stack`: raw RGB + depth pixels area-downsampled to "
        f"{cfg['data'].get('cnn_pixels')} px, stacked as 4 channels into a small CNN trained from scratch (it does "
        f"not see text). `data/concat`: raw pixels downsampled to {cfg['data'].get('flat_pixels')} px and flattened "
        "(+ the caption as a binary bag of words), one MLP. Digits: the raw halves.",
    ]
    lines = [
        "# Fusion at three levels: accuracy, robustness, cost",
        "",
        f"Seeds {seeds}; every gradient model trains through the shared Trainer with the same budget "
        f"({tr['max_steps']} steps, batch {tr['batch_size']}, AdamW lr {tr['lr']}, weight decay "
        f"{tr['weight_decay']}, {tr['warmup_steps']} warm-up steps + cosine). Decision-level strategies are "
        "scikit-learn combiners of one logistic regression per modality, fitted in closed form through the same "
        "Trainer (`fit` on the whole training dict).",
        "All accuracies are in percent on the test split (mean ± sample std over seeds); `val acc` is on the "
        "validation split, which also picks the reference (**bold**, `ref`) of the paired t-tests.",
        "",
        "## How to read this",
        "",
        *(shapesworld_notes if "cnn_pixels" in cfg["data"] else [
            "* **Inputs.** each view standardised with training statistics; `pooled` = the view as one vector, "
            f"`grid` = sequences as time-step tokens, given only to {', '.join(f'`{n}`' for n in cfg['grid_tokens'])}."]),
        "* **Gain** is the difference of mean test accuracy to the best unimodal baseline (chosen by validation "
        "accuracy), in percentage points.",
        f"* **Paired t-test** (`scipy.stats.ttest_rel`, two-sided) over the {len(seeds)} seeds' test accuracies "
        "against the reference. With 3 seeds it has 2 degrees of freedom: it measures only the spread due to "
        "initialisation and batch order on one fixed dataset and test split (not the test-sampling error, which "
        "for n test samples is about sqrt(p(1-p)/n), nor a different draw of the dataset), it has little power "
        "(only large, consistent differences reach p < 0.05), and the p-values are not corrected for the many "
        "comparisons. Decision-level classifiers are deterministic (lbfgs), so their per-seed values vary only "
        "through the shuffled CV folds of `weighted`/`stacking` (`mean` and `vote` fit the same every seed); where the "
        "per-seed difference is constant the test is undefined (–). Read the per-seed columns.",
        "* **Cost.** `params`: the whole model (for decision level: the per-modality logistic regressions' "
        "weights plus the combiner's); `fusion params`: `fusion.fusion_module_params`, the fusion operator + head "
        "(everything after the per-modality encoders; every parameter at data level; 0 for unimodal baselines). "
        "Frozen encoders are not counted and their time is not in the latencies (per-sample encoder latency at "
        "batch 1 is listed per task); `train s` is the Trainer's wall time (or the decision-level `fit`); "
        "latency is the median over single-sample calls on CPU.",
        f"* **Robustness.** At test time a fraction of the test samples loses one modality (the strategies' "
        f"`<m>_mask`) or gets Gaussian noise of std {cfg['robustness']['noise_std']} × the training std of each "
        "input feature (data level: of each pixel channel, clipped to [0, 255]), i.e. noise is added to what "
        "each model consumes: feature noise for feature/decision level, pixel noise for data level, so the noise "
        "rows compare robustness *within* a level better than across levels. Missing inputs follow each "
        "strategy's mechanism (learned missing code, renormalised weights, masked tokens, dropped votes, zeros = "
        "training mean for data level and unimodal baselines). Same corrupted samples for every strategy.",
        "",
    ]
    for t, entries in results["tasks"].items():
        info = results["task_info"][t]
        lines += [f"## {t} ({info['kind']})", "",
                  f"{info['dataset']}; modalities: {', '.join(info['modalities'])}; "
                  f"{info['n']['train']} train / {info['n']['val']} val / {info['n']['test']} test samples; "
                  f"{len(info['class_names'])} classes.",
                  "Inputs: " + "; ".join(f"{k}: {v}" for k, v in info["inputs"].items()) + "."]
        if info.get("encoder_latency_ms"):
            lines.append("Frozen-encoder latency (batch 1, not included below): " + ", ".join(
                f"{m} {v:.1f} ms" for m, v in info["encoder_latency_ms"].items()) + ".")
        if "caption_names_nearest_colour" in info:
            lines.append(f"Text is {'used' if 'text' in info['modalities'] else 'not used'} here: the noisy caption "
                         f"names the nearest object's colour in {info['caption_names_nearest_colour']:.1f} % of the "
                         f"test scenes (it names the largest object's colour half of the time), a partial leak. "
                         f"{info['one_object_scenes']:.1f} % of the test scenes have one object, where RGB alone "
                         "answers.")
        if "caption_shape_wrong" in info:
            lines.append(f"The caption's shape word is wrong in {info['caption_shape_wrong']:.1f} % of the test "
                         "scenes.")
        lines += ["", *[f"* {v}" for v in _verdict(t, entries, info)], "", task_tables(t, entries, info), ""]
        plots = [Path(p).name for p in results["files"] if Path(p).name.startswith(f"fusion_robustness_{t}")
                 and Path(p).suffix == ".png"]
        if plots:
            lines += [f"![missing modality, {t}]({plots[0]})", "",
                      "Per modality and corruption: " + ", ".join(f"[{p}]({p})" for p in plots[1:]), ""]
    lines += [f"Total run time {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU "
              f"({cfg['num_threads'] or 'default'} torch/BLAS thread(s)).", ""]
    return "\n".join(lines)


def format_results(results: Mapping[str, Any]) -> str:
    """Markdown tables for the terminal: per task, accuracy/gain/test, cost, and missing modality."""
    parts = []
    for t, entries in results["tasks"].items():
        info = results["task_info"][t]
        parts.append(f"## {t} ({info['kind']}; modalities {', '.join(info['modalities'])})")
        parts.append("\n".join(f"- {v}" for v in _verdict(t, entries, info)))
        parts.append(task_tables(t, entries, info))
    report = next((f for f in results.get("files", []) if f.endswith("report_fusion.md")), None)
    if report:
        parts.append(f"Report: {report}")
    return "\n\n".join(parts)
