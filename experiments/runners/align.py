"""The aligner comparison: every aligner on the same cached inputs, several seeds, one evaluator.

Each aligner class declares the kind of input it takes per batch key (``inputs``, e.g.
``{"image": "vector", "text": "vector"}`` or ``{"image": "grid", "text": "graph"}``) and builds
itself from the data's dimensions (``from_inputs``); this runner provides every kind a data
view offers and never branches on an aligner's name. Input kinds:

* ``vector``: a fixed feature vector (ShapesWorld/digits images → MobileNetV2 pooled [1280];
  captions → MiniLM [384]; digits halves → the raw 32 pixels of each half);
* ``grid``: MobileNetV2 patch features [P, 1280]; ``pixels``: uint8 images [H, W, 3];
* ``graph``: caption graphs (``align.graphs``); ``raw``: caption strings;
* ``class``: an int label per image, with MiniLM embeddings of the class names.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.config import ConfigError, check_kwargs, from_dict
from experiments.trainer import TrainConfig

log = logging.getLogger(__name__)

RUNNER_KEYS = ("train", "pairing_ratios")  # keys of an aligner's section that configure the run, not the model


@dataclass
class DataSection:
    name: str = "shapesworld"  # shapesworld | digits
    view: str = "image_text"  # image_text | halves (digits: left half ↔ right half)
    n_scenes: int = 2000
    image_size: int = 128
    seed: int = 0
    holdout: list = field(default_factory=list)  # ShapesWorld [[colour, shape], ...] / digits [digit, ...]
    max_eval_images: int | None = 1000  # evaluate on at most this many test images (None = all)


@dataclass
class Config:
    experiment: str = "align"
    data: DataSection = field(default_factory=DataSection)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    aligners: dict = field(default_factory=lambda: {"cca": {"n_components": 64}})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300, batch_size=256, lr=1e-3,
                                                                   weight_decay=0.05, warmup_steps=20))
    feature_batch_size: int = 64
    out_dir: str = "runs/align"


def load(raw: dict, where: str = "config") -> Config:
    """Validate a raw config dict (every key, every aligner name and argument) into a :class:`Config`."""
    from align.base import ALIGNERS

    cfg = from_dict(Config, raw, where)
    if cfg.data.name not in ("shapesworld", "digits"):
        raise ConfigError(f"{where}: data.name must be 'shapesworld' or 'digits', got {cfg.data.name!r}")
    if cfg.data.view not in ("image_text", "halves") or (cfg.data.view == "halves" and cfg.data.name != "digits"):
        raise ConfigError(f"{where}: data.view must be 'image_text' (or 'halves' for digits), got {cfg.data.view!r}")
    if not cfg.aligners:
        raise ConfigError(f"{where}: aligners is empty; known aligners: {', '.join(ALIGNERS.names())}")
    for name, section in cfg.aligners.items():
        if name not in ALIGNERS:
            raise ConfigError(f"{where}: unknown aligner {name!r}; known aligners: {', '.join(ALIGNERS.names())}")
        section = section or {}
        cls = ALIGNERS.get(name)
        model_kwargs = {k: v for k, v in section.items() if k not in RUNNER_KEYS}
        check_kwargs(cls.__init__, model_kwargs, f"aligners.{name}", skip=tuple(cls.auto_inputs))
        from_dict(TrainConfig, {**dataclasses.asdict(cfg.train), **(section.get("train") or {})},
                  f"aligners.{name}.train")
    if not cfg.seeds:
        raise ConfigError(f"{where}: seeds is empty")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------- data


class AlignData:
    """One data view, split into train/test, offering inputs of every kind it has, lazily and cached.

    ``image(kind, split)`` / ``text(kind, texts_key, split)`` return arrays (or graph tensors /
    lists of strings) for the image rows and caption rows of a split.
    """

    def __init__(self, section: DataSection, feature_batch_size: int = 64, cache=None) -> None:
        from experiments.data import load_digits, load_shapesworld
        from experiments.features import FeatureCache

        self.section = section
        self.cache = cache if cache is not None else FeatureCache()
        self.batch_size = feature_batch_size
        if section.name == "shapesworld":
            self.ds = load_shapesworld(n_scenes=section.n_scenes, image_size=section.image_size, seed=section.seed,
                                       holdout=[tuple(h) for h in section.holdout])
            self.images = self.ds.images
            self.label_key = "shape_colour"
        else:
            self.ds = load_digits(image_size=section.image_size, seed=section.seed,
                                  holdout_digits=tuple(int(h) for h in section.holdout))
            self.images = self.ds.images_rgb
            self.label_key = "digit"
        self._memo: dict[tuple, Any] = {}

    @property
    def kinds(self) -> dict[str, set[str]]:
        """Input kinds available per batch key."""
        if self.section.view == "halves":
            return {"image": {"vector"}, "text": {"vector"}}
        kinds = {"image": {"vector", "grid", "pixels"}, "text": {"vector", "graph", "raw"}, "label": {"class"}}
        return kinds

    def describe(self) -> dict[str, str]:
        if self.section.view == "halves":
            return {"image": "left half of the digit (32 raw pixels)", "text": "right half (32 raw pixels)"}
        return {"image": "MobileNetV2 (ImageNet) pooled / 4x4 grid", "text": "MiniLM-L6 sentence embedding"}

    def split_index(self, split: str) -> np.ndarray:
        idx = np.asarray(self.ds.splits[split])
        if split == "test" and self.section.max_eval_images is not None:
            idx = idx[: self.section.max_eval_images]
        return idx

    def captions(self, split: str) -> tuple[list[str], np.ndarray]:
        """Caption strings of the split's images and their image rows (0..n_split-1)."""
        idx = self.split_index(split)
        if self.section.view == "halves":
            return [f"right half {i}" for i in idx], np.arange(len(idx))
        texts = [t for i in idx for t in self.ds.captions[i]]
        t2i = np.repeat(np.arange(len(idx)), [len(self.ds.captions[i]) for i in idx])
        return texts, t2i

    def _memoised(self, key: tuple, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _image_features(self) -> dict[str, np.ndarray]:
        from experiments.features import build_encoder, extract_features

        def compute():
            enc = build_encoder("mobilenet_v2")
            return extract_features(self.images, enc, self.cache, self.ds.fingerprint, "all",
                                    batch_size=self.batch_size, kinds=("pooled", "grid"))

        return self._memoised(("mobilenet_v2",), compute)

    def encode_texts(self, texts: list[str], key: str) -> np.ndarray:
        """MiniLM sentence embeddings [N, 384] of ``texts``, cached under the dataset fingerprint and ``key``."""
        from experiments.features import build_encoder, extract_features

        def compute():
            enc = self._memoised(("minilm-encoder",), lambda: build_encoder("minilm"))
            return extract_features(texts, enc, self.cache, self.ds.fingerprint, key,
                                    batch_size=4 * self.batch_size)["pooled"]

        return self._memoised(("minilm", key), compute)

    def graphs(self, texts: list[str], key: str):
        from align.graphs import TextGraphBuilder, build_caption_graphs

        builder = self._memoised(("graph-builder",), TextGraphBuilder)
        return self._memoised(("graphs", key), lambda: build_caption_graphs(texts, builder, progress=True))

    def image(self, kind: str, split: str) -> Any:
        idx = self.split_index(split)
        if self.section.view == "halves":
            return np.asarray(self.ds.views["left"][idx], dtype=np.float32)
        if kind == "pixels":
            return np.asarray(self.images[idx])
        feats = self._image_features()
        return feats["pooled" if kind == "vector" else "grid"][idx]

    def text(self, kind: str, texts: list[str], key: str) -> Any:
        """Inputs of ``kind`` for caption strings ``texts`` (``key`` names them in the cache)."""
        if kind == "raw":
            return list(texts)
        if kind == "graph":
            return self.graphs(texts, key)
        return self.encode_texts(texts, key)

    def split_text(self, kind: str, split: str) -> tuple[Any, np.ndarray]:
        if self.section.view == "halves":
            idx = self.split_index(split)
            return np.asarray(self.ds.views["right"][idx], dtype=np.float32), np.arange(len(idx))
        texts, t2i = self.captions(split)
        return self.text(kind, texts, f"captions-{split}-{len(texts)}"), t2i

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.ds.labels[self.label_key])[self.split_index(split)]

    def class_embeddings(self) -> torch.Tensor:
        names = self.ds.class_names[self.label_key]
        prompts = [f"a {n}" if self.section.name == "shapesworld" else f"the digit {n}" for n in names]
        return torch.from_numpy(np.asarray(self.encode_texts(prompts, f"classes-{self.label_key}"), dtype=np.float32))

    def dims(self, inputs: dict[str, str]) -> dict[str, int]:
        """Feature dimension of each declared input (0 where not a feature array)."""
        dims = {}
        for key, kind in inputs.items():
            if kind in ("vector", "grid"):
                probe = self.image(kind, "train") if key == "image" else self.split_text(kind, "val")[0]
                dims[key] = int(probe.shape[-1])
            elif kind == "graph":
                dims[key] = int(self.split_text("graph", "val")[0].x.shape[-1])
            else:
                dims[key] = 0
        return dims

    def hard_negatives(self, split: str) -> tuple[list[str], list[str], np.ndarray] | None:
        """(sources, negatives, image row of each) for ShapesWorld, else None."""
        if self.section.name != "shapesworld":
            return None
        idx = self.split_index(split)
        src = [s for i in idx for s in self.ds.hard_negative_sources[i]]
        neg = [s for i in idx for s in self.ds.hard_negatives[i]]
        owner = np.repeat(np.arange(len(idx)), [len(self.ds.hard_negatives[i]) for i in idx])
        return src, neg, owner


# ------------------------------------------------------------------------------------------- run


def _missing_kinds(cls, data: AlignData) -> list[str]:
    offered = data.kinds
    return [f"{k}:{v}" for k, v in cls.inputs.items() if v not in offered.get(k, set())]


def _train_dataset(cls, data: AlignData, seed: int, pairing_ratio: float | None):
    from experiments.pairs import PairedDataset

    per_image, per_text = {}, {}
    texts_kind = cls.inputs.get("text")
    text, t2i = data.split_text(texts_kind, "train") if texts_kind else (None, data.captions("train")[1])
    for key, kind in cls.inputs.items():
        if key == "text":
            per_text["text"] = text
        elif key == "label":
            per_image["label"] = data.labels("train")
        else:
            per_image[key] = data.image(kind, "train")
    if pairing_ratio is not None and pairing_ratio < 1.0:
        # unpaired captions get the image of another unpaired caption, so their true partner is never seen
        from align.cycle_ae import partially_paired

        pp = partially_paired(torch.arange(len(t2i)), torch.from_numpy(t2i), pairing_ratio, seed)
        t2i = pp["text"].numpy()
        per_text["paired"] = pp["paired"].numpy()
    return PairedDataset(per_image, per_text, t2i)


def _evaluate(model, cls, data: AlignData, save_dir: Path | None = None) -> dict[str, Any]:
    """Retrieval (both ways), hard-negative accuracy and, for label predictors, zero-shot hit@k on test.

    With ``save_dir``, the test embeddings are written there as ``image_emb.npy``, ``text_emb.npy``
    and ``text_to_image.npy`` — the inputs of ``alignfuse retrieval``.
    """
    from align.base import encode_in_batches
    from experiments.retrieval import hard_negative_metrics, retrieval_metrics

    img_kind, txt_kind = cls.inputs["image"], cls.inputs.get("text", "vector")
    img_emb = encode_in_batches(model, "image", _as_input(data.image(img_kind, "test")), batch_size=256)
    text, t2i = data.split_text(txt_kind, "test")
    txt_emb = encode_in_batches(model, "text", _as_input(text), batch_size=256)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        for fname, arr in (("image_emb", img_emb.numpy()), ("text_emb", txt_emb.numpy()), ("text_to_image", t2i)):
            _save_npy(save_dir / f"{fname}.npy", arr)
    out = retrieval_metrics(img_emb, txt_emb, t2i, progress=False)
    out["n_test_images"] = int(len(img_emb))
    hn = data.hard_negatives("test")
    if hn is not None:
        src, neg, owner = hn
        pos_emb = encode_in_batches(model, "text", _as_input(data.text(txt_kind, src, "hn-src-test")), 256)
        neg_emb = encode_in_batches(model, "text", _as_input(data.text(txt_kind, neg, "hn-neg-test")), 256)
        hm = hard_negative_metrics(img_emb[torch.as_tensor(owner)], pos_emb, neg_emb,
                                   np.arange(len(owner)))
        out["hard_negative_accuracy"] = hm["per_pair"]
    if hasattr(model, "predict") and "label" in cls.inputs:
        out["zero_shot"] = _zero_shot(model, data)
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _zero_shot(model, data: AlignData) -> dict[str, Any]:
    """Flat hit@k on test (seen labels) and zero-shot split (unseen labels), searching all labels."""
    from align.devise import zero_shot_eval

    ce = data.class_embeddings()
    seen = np.zeros(len(ce), dtype=bool)
    seen[np.unique(data.labels("train"))] = True
    idx = np.concatenate([data.split_index("test"), np.asarray(data.ds.splits.get("zeroshot", []), dtype=np.int64)])
    x = torch.from_numpy(np.asarray(data._image_features()["pooled"][idx], dtype=np.float32))
    labels = torch.from_numpy(np.asarray(data.ds.labels[data.label_key])[idx])
    return zero_shot_eval(model, x, labels, ce, torch.from_numpy(seen))


def _as_input(x: Any) -> Any:
    if isinstance(x, np.ndarray):  # memory-mapped cache rows: copy (float16 widened to float32)
        return torch.from_numpy(np.array(x, dtype=np.float32 if x.dtype == np.float16 else x.dtype))
    return x


def _param_count(model) -> int:
    if isinstance(model, torch.nn.Module):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(sum(np.asarray(v).size for k, v in vars(model).items() if k.endswith("weights_")))


def run_one(name: str, section: dict, cfg: Config, data: AlignData, seed: int,
            pairing_ratio: float | None = None, save_dir: Path | None = None) -> dict[str, Any]:
    """Build, train (or fit) and evaluate aligner ``name`` with one seed (test embeddings to ``save_dir``)."""
    from align.base import ALIGNERS
    from experiments.trainer import Trainer

    cls = ALIGNERS.get(name)
    torch.manual_seed(seed)
    np.random.seed(seed)
    context = {"class_embeddings": data.class_embeddings()} if "label" in cls.inputs else {}
    model_kwargs = {k: v for k, v in (section or {}).items() if k not in RUNNER_KEYS}
    model = cls.from_inputs(data.dims(cls.inputs), **context, **model_kwargs)
    train_cfg = from_dict(TrainConfig, {**dataclasses.asdict(cfg.train), **((section or {}).get("train") or {}),
                                        "seed": seed, "out_dir": None})
    dataset = _train_dataset(cls, data, seed, pairing_ratio)
    t0 = time.perf_counter()
    result = Trainer(train_cfg).fit(model, dataset)
    seconds = time.perf_counter() - t0
    metrics = _evaluate(model, cls, data, save_dir)
    metrics.update(train_seconds=seconds, params_trained=_param_count(model), steps=result.steps)
    return metrics


def run(cfg: Config) -> dict[str, Any]:
    """Run every aligner over every seed; write results.json, report_align.md and plots into ``out_dir``."""
    from align.base import ALIGNERS
    from experiments.report import aggregate_seeds, write_json

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = AlignData(cfg.data, cfg.feature_batch_size)
    results: dict[str, Any] = {"data": {**dataclasses.asdict(cfg.data), "inputs": data.describe()},
                               "seeds": list(cfg.seeds), "aligners": {}, "skipped": {}}
    for name, section in cfg.aligners.items():
        cls = ALIGNERS.get(name)
        missing = _missing_kinds(cls, data)
        if missing:
            results["skipped"][name] = f"needs inputs this data view lacks: {', '.join(missing)}"
            log.info("skipping %s: %s", name, results["skipped"][name])
            continue
        per_seed = []
        for i, seed in enumerate(cfg.seeds):
            log.info("aligner %s, seed %d", name, seed)
            per_seed.append(run_one(name, section, cfg, data, seed,
                                    save_dir=out / "embeddings" / name if i == 0 else None))
        agg = aggregate_seeds(per_seed)
        agg["per_seed_rsum"] = [r["rsum"] for r in per_seed]
        results["aligners"][name] = agg
        for ratio in (section or {}).get("pairing_ratios") or []:
            runs = [run_one(name, section, cfg, data, s, pairing_ratio=float(ratio)) for s in cfg.seeds]
            results.setdefault("pairing", {}).setdefault(name, {})[str(ratio)] = aggregate_seeds(runs)
    results["chance"] = _chance(data)
    results["files"] = {"results": str(out / "results.json"), "report": str(out / "report_align.md")}
    if results["aligners"]:
        results["files"].update(_plots(results, data, out))
    write_json(out / "results.json", results)
    report = format_results(results)
    for key, title in (("recall_plot", "Retrieval recall per aligner"), ("space_map", "Shared space")):
        if key in results["files"]:
            report += f"\n\n![{title}]({Path(results['files'][key]).name})"
    (out / "report_align.md").write_text(report + "\n")
    return results


def _plots(results: dict[str, Any], data: AlignData, out: Path) -> dict[str, str]:
    """Recall bars per aligner, and a 2-D map of the best aligner's shared space (seed-0 test embeddings)."""
    from experiments.report import grouped_bars, shared_space_map

    names = list(results["aligners"])
    series, errors = {}, {}
    for direction, short in (("image_to_text", "i→t"), ("text_to_image", "t→i")):
        for k in (1, 5, 10):
            series[f"{short} R@{k}"] = [results["aligners"][n][direction][f"R@{k}"] for n in names]
            errors[f"{short} R@{k}"] = [results["aligners"][n][direction][f"R@{k}_std"] for n in names]
    files = {"recall_plot": str(grouped_bars(out / "align_recall.png", names, series, errors, ylabel="recall %",
                                             title=f"Retrieval on {data.section.name} test images"))}
    best = max(names, key=lambda n: results["aligners"][n]["rsum"])
    emb_dir = out / "embeddings" / best
    if (emb_dir / "image_emb.npy").exists():
        img, txt = np.load(emb_dir / "image_emb.npy"), np.load(emb_dir / "text_emb.npy")
        t2i = np.load(emb_dir / "text_to_image.npy")
        labels = data.labels("test")
        names_ = data.ds.class_names[data.label_key]
        classes = [c for c, _ in zip(*np.unique(labels, return_counts=True))]
        counts = np.bincount(labels)
        top = set(np.argsort(-counts)[:5].tolist()) & set(int(c) for c in classes)
        im_rows = [i for i in range(len(img)) if int(labels[i]) in top][:150]
        tx_rows = [j for j in range(len(txt)) if int(labels[t2i[j]]) in top][:150]
        files["space_map"] = str(shared_space_map(
            out / "align_space.png", img[im_rows], txt[tx_rows], [names_[labels[i]] for i in im_rows],
            [names_[labels[t2i[j]]] for j in tx_rows],
            title=f"{best}: shared space (PCA), o image, x caption; class = {data.label_key}"))
    return files


def _chance(data: AlignData) -> dict[str, float]:
    """Expected R@1 (%) of a random ranking, both directions, on the test split."""
    _, t2i = data.captions("test")
    n_img, n_txt = int(t2i.max()) + 1, len(t2i)
    caps = n_txt / n_img
    return {"image_to_text_R@1": 100.0 * min(1.0, caps / n_txt * 1.0), "text_to_image_R@1": 100.0 / n_img}


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
                     f"{ch['text_to_image_R@1']:.2f} %; hard-negative chance 50 %. Mean ± std over seeds "
                     f"{results['seeds']}.")
    zs_rows = []
    for name, r in results["aligners"].items():
        zs = r.get("zero_shot")
        if zs and np.isfinite(zs.get("unseen", {}).get("hit@1", float("nan"))):
            zs_rows.append([name] + [fmt(100 * zs[part][f"hit@{k}"], 100 * zs[part].get(f"hit@{k}_std", 0.0))
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
