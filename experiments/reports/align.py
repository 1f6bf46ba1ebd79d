"""The aligner comparison's report: the recall table (mean ± std over seeds), zero-shot and pairing-ratio tables,
recall bars and a 2-D map of the best aligner's shared space."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plots(results: dict[str, Any], views: Any, out: Path) -> dict[str, str]:
    """Recall bars per aligner, and a 2-D map of the best aligner's shared space (seed-0 test embeddings)."""
    from experiments.report import grouped_bars, shared_space_map

    names = list(results["aligners"])
    series, errors = {}, {}
    for direction, short in (("image_to_text", "i→t"), ("text_to_image", "t→i")):
        for k in (1, 5, 10):
            series[f"{short} R@{k}"] = [results["aligners"][n][direction][f"R@{k}"] for n in names]
            errors[f"{short} R@{k}"] = [results["aligners"][n][direction][f"R@{k}_std"] or 0.0 for n in names]
    files = {"recall_plot": str(grouped_bars(out / "align_recall.png", names, series, errors, ylabel="recall %",
                                             title=f"Retrieval on {views.name} test images"))}
    best = max(names, key=lambda n: results["aligners"][n]["rsum"])
    emb_dir = out / "embeddings" / best
    if (emb_dir / "image_emb.npy").exists() and views.src.labels is not None:
        img, txt = np.load(emb_dir / "image_emb.npy"), np.load(emb_dir / "text_emb.npy")
        t2i = np.load(emb_dir / "text_to_image.npy")
        labels = views.labels("test")
        names_ = views.src.class_names
        classes = [c for c, _ in zip(*np.unique(labels, return_counts=True))]
        counts = np.bincount(labels)
        top = set(np.argsort(-counts)[:5].tolist()) & set(int(c) for c in classes)
        im_rows = [i for i in range(len(img)) if int(labels[i]) in top][:150]
        tx_rows = [j for j in range(len(txt)) if int(labels[t2i[j]]) in top][:150]
        files["space_map"] = str(shared_space_map(
            out / "align_space.png", img[im_rows], txt[tx_rows], [names_[labels[i]] for i in im_rows],
            [names_[labels[t2i[j]]] for j in tx_rows],
            title=f"{best}: shared space (PCA), o image, x caption; class = {views.src.label_key}"))
    return files



def format_results(results: dict[str, Any]) -> str:
    """Markdown table: recalls both ways, rsum, hard-negative accuracy, params, time (mean ± std over seeds)."""
    from experiments.report import fmt, markdown_table

    rows = []
    for name, r in results["aligners"].items():
        i2t, t2i = r["image_to_text"], r["text_to_image"]
        row = [name]
        for d in (i2t, t2i):
            row += [fmt(d[f"R@{k}"], d[f"R@{k}_std"]) for k in (1, 5, 10)]
        row += [fmt(r["rsum"], r["rsum_std"]),
                fmt(r["hard_negative_accuracy"], r["hard_negative_accuracy_std"]) if "hard_negative_accuracy" in r
                else "–", f"{int(r['params_trained']):,}", fmt(r["train_seconds"], r["train_seconds_std"])]
        rows.append(row)
    headers = ["aligner", "i→t R@1", "i→t R@5", "i→t R@10", "t→i R@1", "t→i R@5", "t→i R@10", "rsum",
               "hard-neg acc %", "params trained", "train s"]
    lines = [markdown_table(headers, rows)]
    ch = results.get("chance")
    if ch:
        lines.append(f"\nChance R@1: image→text {ch['image_to_text_R@1']:.2f} %, text→image "
                     f"{ch['text_to_image_R@1']:.2f} %; hard-negative chance 50 %. "
                     + (f"Mean ± std over seeds {results['seeds']}." if len(results["seeds"]) > 1
                        else f"One seed ({results['seeds'][0]})."))
    match = matching_table(results)
    if match:
        lines.append("\n" + match)
    zs_rows = []
    for name, r in results["aligners"].items():
        zs = r.get("zero_shot")
        if zs and np.isfinite(zs.get("unseen", {}).get("hit@1", float("nan"))):
            zs_rows.append([name] + [fmt(100 * zs[part][f"hit@{k}"], _scaled(zs[part].get(f"hit@{k}_std")))
                                     for part in ("seen", "unseen", "unseen_only") for k in (1, 5)])
    if zs_rows:
        lines.append("\nZero-shot label prediction (flat hit@k %, labels held out of training; seen/unseen "
                     "search all labels, unseen-only searches the unseen labels):\n")
        lines.append(markdown_table(["aligner", "seen hit@1", "seen hit@5", "unseen hit@1", "unseen hit@5",
                                     "unseen-only hit@1", "unseen-only hit@5"], zs_rows))
    for ratio_name, by_ratio in results.get("pairing", {}).items():
        full = results["aligners"][ratio_name]
        rows = [["1.0", fmt(full["rsum"], full["rsum_std"])]] + [
            [ratio, fmt(r["rsum"], r["rsum_std"])] for ratio, r in by_ratio.items()]
        lines.append(f"\n{ratio_name}: retrieval rsum vs. share of training pairs known to be paired (the rest "
                     "train only reconstruction and cycle terms):\n")
        lines.append(markdown_table(["pairing ratio", "rsum"], rows))
    for name, why in results.get("skipped", {}).items():
        lines.append(f"\n{name}: skipped ({why}).")
    return "\n".join(lines)


def matching_table(results: dict[str, Any]) -> str:
    """Markdown table of the aligners with a matching head (``"matching"`` results): retrieval by ITC and after ITM
    re-ranking of the top k (R@1 both ways, rsum) and hard-negative accuracy by ITM and by ITC; "" when none."""
    from experiments.report import fmt, markdown_table

    rows = []
    for name, r in results["aligners"].items():
        m = r.get("matching")
        if not m:
            continue
        row = [name, str(int(m["k"]))]
        for d in ("image_to_text", "text_to_image"):
            row += [fmt(m[s][d]["R@1"], m[s][d].get("R@1_std")) for s in ("itc", "itm_rerank")]
        row += [fmt(m[s]["rsum"], m[s].get("rsum_std")) for s in ("itc", "itm_rerank")]
        row += [fmt(m[key], m.get(f"{key}_std")) if key in m else "–"
                for key in ("hard_negative_accuracy_itm", "hard_negative_accuracy_itc")]
        row.append(fmt(m["rerank_seconds"], m.get("rerank_seconds_std")))
        rows.append(row)
    if not rows:
        return ""
    headers = ["aligner", "k", "i→t R@1 ITC", "i→t R@1 re-ranked", "t→i R@1 ITC", "t→i R@1 re-ranked", "rsum ITC",
               "rsum re-ranked", "hard-neg acc ITM %", "hard-neg acc ITC %", "re-rank s"]
    return ("Matching head (BLIP-2's ITM), with and without re-ranking: ITC = the highest cosine over the queries; "
            "re-ranked = each query's top k by ITC re-scored by ITM log-odds + ITC:\n\n" + markdown_table(headers, rows))


def _scaled(std: float | None) -> float | None:
    return None if std is None else 100 * std
