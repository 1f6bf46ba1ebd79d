"""Evaluation of a bridge model on held-out ShapesWorld images: captions (stage 1) and questions (stage 2).

Captions: NLL per caption token (eos included) with the image, no image and a shuffled image, the
paired image gain with a bootstrap interval (:func:`paired_gain`), hard-negative ranking, and the
**attribute accuracy** of greedy captions (colour/shape words, synonyms and plurals included, that
some object of the scene has; the other-scene control checks the same words against another scene),
plus how many of the example captions are distinct. For ``grid_tags`` also what the LM is shown
(:func:`layout_metrics`: object count and the colour/shape of each shown cell against the scene).

Questions (:func:`evaluate_vqa`): exact match of the normalised generated answer per question type,
with the image, with no image, with a shuffled image (another scene's), and the most-frequent-answer
control per type; separately for the held-out phrasings.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch

from experiments.data.shapesworld import COLOUR_WORDS, SHAPE_WORDS
from experiments.data.vqa import QUESTION_TYPES, Question, normalise_answer


def batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def caption_nlls(mllm: Any, images: Any, rows: np.ndarray, captions: list[str], mode: str, batch: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL ``[n]`` and token count ``[n]`` of each caption (eos included) given ``images[rows]``."""
    total, count = [], []
    for sl in batches(len(captions), batch):
        nll, m = mllm.token_nll({"image": images[rows[sl]], "text": captions[sl]}, mode)
        total.append(nll.sum(1).double().cpu().numpy())
        count.append(m.sum(1).double().cpu().numpy())
    return np.concatenate(total), np.concatenate(count)


def per_token(nlls: tuple[np.ndarray, np.ndarray]) -> float:
    total, count = nlls
    return float(total.sum() / max(count.sum(), 1.0))


def corpus_nll(mllm: Any, images: Any, rows: np.ndarray, captions: list[str], mode: str, batch: int) -> float:
    """NLL per caption token over all ``captions`` (corpus level)."""
    return per_token(caption_nlls(mllm, images, rows, captions, mode, batch))


def paired_gain(control: tuple[np.ndarray, np.ndarray], image: tuple[np.ndarray, np.ndarray],
                n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Control NLL per token minus image NLL per token on the same captions, paired bootstrap 95 % interval
    (captions resampled) and the % of captions whose per-token NLL is lower with the image."""
    (c_tot, cnt), (i_tot, cnt_i) = control, image
    if not np.array_equal(cnt, cnt_i):
        raise ValueError("paired_gain needs NLLs of the same captions (token counts differ)")
    diff = c_tot - i_tot
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    lo, hi = np.quantile(diff[idx].sum(1) / cnt[idx].sum(1), [0.025, 0.975])
    return {"gain": float(diff.sum() / cnt.sum()), "ci95": [float(lo), float(hi)],
            "captions_better_pct": float(100 * np.mean(diff > 0))}


@torch.no_grad()
def ranking(mllm: Any, ev: dict[str, Any], mode: str, batch: int) -> dict[str, float]:
    """% of (source caption, hard negative) pairs where the source is more likely given the image."""
    rows = ev["negative_rows"]
    ll_neg, ll_src = [], []
    for sl in batches(len(rows), batch):
        img = ev["image"][rows[sl]]
        ll_neg.append(mllm.score_captions(img, ev["negatives"][sl], mode))
        ll_src.append(mllm.score_captions(img, ev["sources"][sl], mode))
    win = (torch.cat(ll_src) > torch.cat(ll_neg)).numpy()
    kinds = np.array(ev["negative_kinds"])
    return {"all": float(win.mean() * 100), **{k: float(win[kinds == k].mean() * 100) for k in sorted(set(kinds))}}


# ---------------------------------------------------------------------------------- attribute parsing

_COLOURS = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
_SHAPES = {(w + suffix): s for s, ws in SHAPE_WORDS.items() for w in ws
           for suffix in ("", "es" if w.endswith(("s", "x", "sh")) else "s")}
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted([*_COLOURS, *_SHAPES], key=len, reverse=True))
                      + r")\b")


def parse_attributes(text: str) -> list[tuple[str, str]]:
    """Named attributes of a caption in order: ``[("colour", "red"), ("shape", "circle"), ...]``."""
    return [("colour", _COLOURS[w]) if w in _COLOURS else ("shape", _SHAPES[w])
            for w in (m.group(1) for m in _PATTERN.finditer(text.lower()))]


def _have(scene: dict) -> set[tuple[str, str]]:
    return {("colour", o["colour"]) for o in scene["objects"]} | {("shape", o["shape"]) for o in scene["objects"]}


def attribute_metrics(texts: list[str], scenes: list[dict]) -> dict[str, float]:
    """Precision/recall of the colours and shapes named in ``texts[i]`` against ``scenes[i]`` (module doc)."""
    if len(texts) != len(scenes):
        raise ValueError(f"{len(texts)} captions but {len(scenes)} scenes")
    named = correct = other_correct = pairs = pairs_ok = recalled = scene_total = 0
    n = len(texts)
    for i, (text, scene) in enumerate(zip(texts, scenes)):
        attrs = parse_attributes(text)
        have, other = _have(scene), _have(scenes[(i + max(1, n // 2)) % n] if n > 1 else scene)
        named += len(attrs)
        correct += sum(a in have for a in attrs)
        other_correct += sum(a in other for a in attrs)
        recalled += len(have & set(attrs))
        scene_total += len(have)
        objects = {(o["colour"], o["shape"]) for o in scene["objects"]}
        for a, b in zip(attrs, attrs[1:]):
            if a[0] == "colour" and b[0] == "shape":
                pairs += 1
                pairs_ok += (a[1], b[1]) in objects
    return {"attribute_accuracy": correct / named if named else 0.0,
            "attribute_accuracy_other_scene": other_correct / named if named else 0.0,
            "attribute_recall": recalled / scene_total if scene_total else 0.0,
            "object_precision": pairs_ok / pairs if pairs else 0.0, "named_per_caption": named / max(n, 1)}


def layout_metrics(layouts: list[str], scenes: list[dict], side: int) -> dict[str, float]:
    """How well ``grid_tags`` layouts (``"col row word …; …"``, :meth:`align.connector_grid.GridTags.layout`) match
    the scenes: images whose number of shown cells equals their number of objects, and, for each shown cell, whether
    its words name the colour / the shape of the object whose centre is nearest to the cell's centre. Relation
    phrases (``relations=True``: entries without coordinates) are not cells and are skipped."""
    if len(layouts) != len(scenes):
        raise ValueError(f"{len(layouts)} layouts but {len(scenes)} scenes")
    exact = cells = colour_ok = shape_ok = 0
    for layout, scene in zip(layouts, scenes):
        shown = [c.split() for c in layout.split("; ") if c and c.split()[0].isdigit()]
        exact += len(shown) == len(scene["objects"])
        for col, row, *words in shown:
            x, y = (int(col) - 0.5) / side, (int(row) - 0.5) / side
            obj = min(scene["objects"], key=lambda o: (o["x"] - x) ** 2 + (o["y"] - y) ** 2)
            named = set(parse_attributes(" ".join(words)))
            cells += 1
            colour_ok += ("colour", obj["colour"]) in named
            shape_ok += ("shape", obj["shape"]) in named
    return {"layout_count_exact": exact / max(len(scenes), 1), "layout_cells_per_image": cells / max(len(scenes), 1),
            "layout_colour_accuracy": colour_ok / max(cells, 1), "layout_shape_accuracy": shape_ok / max(cells, 1)}


@torch.no_grad()
def evaluate_captions(mllm: Any, ev: dict[str, Any], batch: int, max_new_tokens: int, n_examples: int,
                      controls: bool = True) -> dict[str, Any]:
    """Caption NLL (+ shuffled / no-image controls and gains), hard-negative ranking, generated-caption metrics."""
    b = min(batch, len(ev["image"]))  # <= n images: a roll never pairs a row with its own image
    with_image = caption_nlls(mllm, ev["image"], ev["caption_rows"], ev["captions"], "image", b)
    out: dict[str, Any] = {"caption_nll": per_token(with_image)}
    if controls:
        shuffled = caption_nlls(mllm, ev["image"], ev["caption_rows"], ev["captions"], "shuffled", b)
        none = caption_nlls(mllm, ev["image"], ev["caption_rows"], ev["captions"], "none", b)
        out.update(shuffled_image_nll=per_token(shuffled), no_image_nll=per_token(none),
                   gain_vs_shuffled=paired_gain(shuffled, with_image), gain_vs_no_image=paired_gain(none, with_image))
        if len(ev["negatives"]):  # hard negatives come from scene metadata (ShapesWorld)
            rank = ranking(mllm, ev, "image", b)
            out["hard_negative_ranking"] = rank.pop("all")
            out["hard_negative_ranking_by_kind"] = rank
    texts: list[str] = []
    for sl in batches(len(ev["image"]), b):
        texts += mllm.generate(ev["image"][sl], max_new_tokens)
    if ev["scenes"] is not None:  # attribute accuracy needs the scene metadata
        out.update(attribute_metrics(texts, ev["scenes"]))
        if hasattr(mllm.connector, "layout"):  # grid_tags: what the LM is shown, against the scenes
            side = round(ev["image"].shape[1] ** 0.5)
            out.update(layout_metrics(mllm.connector.layout(ev["image"]), ev["scenes"], side))
    examples = texts[:n_examples]
    out["distinct_examples"] = len(set(examples))
    out["n_examples"] = len(examples)
    out["distinct_captions_pct"] = 100.0 * len(set(texts)) / max(len(texts), 1)
    out["samples"] = [{"generated": t, "reference": r} for t, r in zip(examples, ev["truth"])]
    return out


# ------------------------------------------------------------------------------------------- questions


@torch.no_grad()
def answer(mllm: Any, images: torch.Tensor, questions: Sequence[Question], mode: str, batch: int,
           max_new_tokens: int = 6) -> list[str]:
    """Generated answers to ``questions`` (``images[q.scene]``); ``mode`` as in ``MultimodalLM.chat``."""
    out: list[str] = []
    for sl in batches(len(questions), batch):
        qs = questions[sl]
        img = images[torch.as_tensor([q.scene for q in qs])]
        if mode == "shuffled":  # another scene's image: rows rolled over the whole eval set
            img = images[torch.as_tensor([(q.scene + 1) % len(images) for q in qs])]
        out += mllm.chat(img, [q.question for q in qs], max_new_tokens, "none" if mode == "none" else "image")
    return out


def vqa_accuracy(questions: Sequence[Question], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy (%) per question type and overall."""
    ok = np.array([normalise_answer(a) == q.answer for q, a in zip(questions, answers)])
    types = np.array([q.type for q in questions])
    out = {t: float(100 * ok[types == t].mean()) for t in QUESTION_TYPES if (types == t).any()}
    out["overall"] = float(100 * ok.mean()) if len(ok) else 0.0
    return out


def evaluate_vqa(mllm: Any, images: torch.Tensor, seen: Sequence[Question], held_out: Sequence[Question],
                 majority: dict[str, str], batch: int, n_examples: int = 8, controls: bool = True) -> dict[str, Any]:
    """Accuracy per type: image / no image / shuffled image / majority answer; held-out phrasings (image).
    Without ``controls``: the image accuracy only."""
    res: dict[str, Any] = {}
    answers = answer(mllm, images, seen, "image", batch)
    res["image"] = vqa_accuracy(seen, answers)
    if not controls:
        return res
    for mode in ("none", "shuffled"):
        res[f"{mode}_image"] = vqa_accuracy(seen, answer(mllm, images, seen, mode, batch))
    res["majority"] = vqa_accuracy(seen, [majority.get(q.type, "") for q in seen])
    res["held_out_phrasing"] = vqa_accuracy(held_out, answer(mllm, images, held_out, "image", batch))
    res["n_questions"] = {"seen": len(seen), "held_out_phrasing": len(held_out)}
    res["examples"] = [{"scene": q.scene, "question": q.question, "answer": a, "truth": q.answer}
                       for q, a in list(zip(seen, answers))[:n_examples]]
    return res
