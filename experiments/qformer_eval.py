"""Evaluating the Q-Former aligner (``align.qformer_aligner``) as BLIP-2 does, and its objective ablation.

* :func:`qformer_retrieval_metrics` — retrieval by ITC (the highest cosine over the queries) and the same
  after **ITM re-ranking** of each query's top-``k`` ITC candidates, both directions (BLIP/BLIP-2's
  protocol: candidate score = ITM log-odds + ITC similarity; candidates outside the top-k keep their ITC
  order below the re-ranked ones). Ranks go through :func:`experiments.retrieval.metrics_from_ranks`, so
  R@K, median/mean rank and rsum mean what they mean for every other aligner.
* :func:`itm_hard_negative_metrics` — compositional hard-negative accuracy by ITM score, through
  :func:`experiments.retrieval.hard_negative_metrics` (a pair is won when the true caption's score is
  strictly higher).
* ``python -m experiments.qformer_eval`` — the ablation (ITC / +ITM / +ITG / +classification) on the
  demo's ShapesWorld data; see ``--help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from experiments.retrieval import hard_negative_metrics, metrics_from_ranks, ranks_from_scores, retrieval_metrics

log = logging.getLogger(__name__)


def _chunks(n: int, size: int):
    return ((s, min(n, s + size)) for s in range(0, n, size))


@torch.no_grad()
def itc_score_matrix(model, grid: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """ITC similarity [N_img, N_txt] (max over queries) of grids [N_img, P, d] and caption strings; for a model
    without query embeddings, the cosine of its ``encode`` embeddings."""
    model.eval()
    if not hasattr(model, "image_query_embeddings"):
        from align.base import encode_in_batches

        img = encode_in_batches(model, "image", torch.as_tensor(np.asarray(grid, dtype=np.float32)), batch_size)
        txt = encode_in_batches(model, "text", list(texts), batch_size)
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
        return (img @ txt.T).numpy().astype(np.float64)
    img = torch.cat([model.image_query_embeddings(torch.as_tensor(np.asarray(grid[s:e], dtype=np.float32)))
                     for s, e in _chunks(len(grid), batch_size)])
    txt = torch.cat([model.text_embeddings(list(texts[s:e])) for s, e in _chunks(len(texts), batch_size)])
    from align.qformer_aligner import max_query_similarity

    return max_query_similarity(img, txt).cpu().numpy().astype(np.float64)


@torch.no_grad()
def itm_pair_scores(model, grid: Any, texts: Sequence[str], image_rows: np.ndarray, text_rows: np.ndarray,
                    batch_size: int = 64) -> np.ndarray:
    """ITM log-odds [M] of the pairs (grid[image_rows[m]], texts[text_rows[m]])."""
    model.eval()
    out = np.empty(len(image_rows), dtype=np.float64)
    for s, e in _chunks(len(image_rows), batch_size):
        g = torch.as_tensor(np.asarray(grid[np.asarray(image_rows[s:e])], dtype=np.float32))
        out[s:e] = model.itm_scores(g, [texts[int(j)] for j in text_rows[s:e]]).float().cpu().numpy()
    return out


def rerank_scores(model, grid: Any, texts: Sequence[str], itc: np.ndarray, k: int = 16, batch_size: int = 64
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices after ITM re-ranking of each image's top-``k`` captions (first) and each caption's top-``k``
    images (second): candidates get ``offset + ITM log-odds + ITC``, the rest keep their ITC score (below)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_img, n_txt = itc.shape
    offset = 1e4
    i2t, t2i = itc.copy(), itc.copy()
    ki, kt = min(k, n_txt), min(k, n_img)
    top_t = np.argsort(-itc, axis=1, kind="stable")[:, :ki]  # [N_img, ki] captions per image
    top_i = np.argsort(-itc, axis=0, kind="stable")[:kt, :]  # [kt, N_txt] images per caption
    rows = np.concatenate([np.repeat(np.arange(n_img), ki), top_i.T.reshape(-1)])
    cols = np.concatenate([top_t.reshape(-1), np.repeat(np.arange(n_txt), kt)])
    pairs = np.unique(np.stack([rows, cols], 1), axis=0)  # each (image, caption) pair scored once
    scores = itm_pair_scores(model, grid, texts, pairs[:, 0], pairs[:, 1], batch_size)
    lookup = np.full((n_img, n_txt), np.nan)
    lookup[pairs[:, 0], pairs[:, 1]] = scores
    r = np.repeat(np.arange(n_img), ki)
    i2t[r, top_t.reshape(-1)] = offset + lookup[r, top_t.reshape(-1)] + itc[r, top_t.reshape(-1)]
    c = np.tile(np.arange(n_txt), kt)
    t2i[top_i.reshape(-1), c] = offset + lookup[top_i.reshape(-1), c] + itc[top_i.reshape(-1), c]
    return i2t, t2i


def qformer_retrieval_metrics(model, grid: Any, texts: Sequence[str], text_to_image: np.ndarray, k: int = 16,
                              batch_size: int = 64) -> dict[str, Any]:
    """``{"itc": metrics, "itm_rerank": metrics, "k": k, "rerank_seconds": s}``, each metrics dict as
    :func:`experiments.retrieval.retrieval_metrics` returns it (R@K both ways, ranks, ``rsum``)."""
    itc = itc_score_matrix(model, grid, texts)
    out: dict[str, Any] = {"itc": metrics_from_ranks(ranks_from_scores(itc, itc, text_to_image))}
    t0 = time.perf_counter()
    i2t, t2i = rerank_scores(model, grid, texts, itc, k, batch_size)
    out["itm_rerank"] = metrics_from_ranks(ranks_from_scores(i2t, t2i, text_to_image))
    out.update(k=int(k), rerank_seconds=time.perf_counter() - t0)
    return out


def itm_hard_negative_metrics(model, grid: Any, sources: Sequence[str], negatives: Sequence[str],
                              owner: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Hard-negative accuracy by ITM (and by ITC max-sim): does ``sources[m]`` outscore ``negatives[m]`` on
    image ``owner[m]``? Scores enter :func:`hard_negative_metrics` as 1-D embeddings (unnormalised)."""
    owner = np.asarray(owner, dtype=np.int64)
    ones = np.ones((len(owner), 1))
    pos = itm_pair_scores(model, grid, sources, owner, np.arange(len(owner)), batch_size)
    neg = itm_pair_scores(model, grid, negatives, owner, np.arange(len(owner)), batch_size)
    itm = hard_negative_metrics(ones, pos[:, None], neg[:, None], np.arange(len(owner)), normalize=False)
    with torch.no_grad():
        model.eval()
        imgs = torch.cat([model.image_query_embeddings(torch.as_tensor(np.asarray(grid[owner[s:e]], np.float32)))
                          for s, e in _chunks(len(owner), 256)])
        ps = torch.cat([model.text_embeddings(list(sources[s:e])) for s, e in _chunks(len(owner), 256)])
        ns = torch.cat([model.text_embeddings(list(negatives[s:e])) for s, e in _chunks(len(owner), 256)])
        itc_pos = torch.einsum("nqd,nd->nq", imgs, ps).amax(1).float().cpu().numpy()[:, None]
        itc_neg = torch.einsum("nqd,nd->nq", imgs, ns).amax(1).float().cpu().numpy()[:, None]
    itc = hard_negative_metrics(ones, itc_pos, itc_neg, np.arange(len(owner)), normalize=False)
    return {"itm": itm["per_pair"], "itm_per_image": itm["per_image"], "itc": itc["per_pair"],
            "n_pairs": itm["n_pairs"]}


def matching_metrics(model, grid: Any, texts: Sequence[str], text_to_image: np.ndarray,
                     hard_negatives: tuple[Sequence[str], Sequence[str], np.ndarray] | None = None,
                     k: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """What the align runner adds for an aligner with ``itm_scores`` (BLIP's evaluation): retrieval by ITC and after
    ITM re-ranking of the top ``k`` (default: the model's ``rerank_k``, else 16), and, with ``hard_negatives``
    ``(true captions, false captions, image row of each)``, hard-negative accuracy by ITM and by ITC.

    Returns ``{"k", "itc": metrics, "itm_rerank": metrics, "rerank_seconds"[, "hard_negative_accuracy_itm",
    "hard_negative_accuracy_itc", "hard_negative_pairs"]}``; metrics as :func:`metrics_from_ranks` gives them."""
    k = int(k or getattr(model, "rerank_k", 16))
    grid = np.asarray(grid, dtype=np.float32)
    out = qformer_retrieval_metrics(model, grid, list(texts), np.asarray(text_to_image), k=k, batch_size=batch_size)
    if hard_negatives is not None:
        src, neg, owner = hard_negatives
        hn = itm_hard_negative_metrics(model, grid, list(src), list(neg), np.asarray(owner), batch_size)
        out.update(hard_negative_accuracy_itm=hn["itm"], hard_negative_accuracy_itc=hn["itc"],
                   hard_negative_pairs=hn["n_pairs"])
    return out


# ------------------------------------------------------------------------------------------ ablation

VARIANTS: dict[str, dict[str, float]] = {
    "itc": {"itc_weight": 1.0, "itm_weight": 0.0, "itg_weight": 0.0, "cls_weight": 0.0},
    "itc+itm": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 0.0, "cls_weight": 0.0},
    "itc+itm+itg": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 1.0, "cls_weight": 0.0},
    "itc+itm+itg+cls": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 1.0, "cls_weight": 1.0},
    # the same, with each training caption's image also given one of its ShapesWorld hard negatives for ITM
    "itc+itm+itg+cls+hn": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 1.0, "cls_weight": 1.0},
    # ITM also on compositional negatives of training scenes (experiments.qformer_data.training_negatives: one of
    # --train-negatives per image drawn each step, beside the true caption it was edited from)
    "itc+itm+neg": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 0.0, "cls_weight": 0.0},
    "itc+itm+itg+neg": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 1.0, "cls_weight": 0.0},
    "itc+itm+itg+cls+neg": {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 1.0, "cls_weight": 1.0},
}


def _data(n_scenes: int, max_eval_images: int, encoder_size: int | None = None):
    """The demo's ShapesWorld (no held-out combinations), MobileNetV2 grids from the feature cache: 4x4 on the
    128 px scenes, 8x8 with ``encoder_size=256`` (the scenes upsampled, as the bridge's ``grid_tags`` reads them)."""
    from experiments.data import load_shapesworld
    from experiments.features import FeatureCache, build_encoder, extract_features

    ds = load_shapesworld(n_scenes=n_scenes, image_size=128, seed=0, holdout=[])
    encoder = build_encoder("mobilenet_v2", **({"image_size": encoder_size} if encoder_size else {}))
    feats = extract_features(ds.images, encoder, FeatureCache(), ds.fingerprint, "all", kinds=("pooled", "grid"))
    return ds, feats["grid"], np.asarray(ds.splits["test"])[:max_eval_images]


def _train_negatives(name: str, ds, tr: np.ndarray, t2i: np.ndarray, seed: int, per_image: int) -> dict[str, Any]:
    """Per-caption ITM extras of variant ``name`` (``+hn``: the data set's own, ``+neg``: training negatives)."""
    if name.endswith("+hn"):  # one training hard negative of the caption's image, drawn once (seeded)
        rng = np.random.default_rng(seed)
        return {"hard_negative": [ds.hard_negatives[tr[g]][rng.integers(len(ds.hard_negatives[tr[g]]))]
                                  if ds.hard_negatives[tr[g]] else "" for g in t2i]}
    if name.endswith("+neg"):
        if hasattr(ds, "train_negatives"):
            negs, srcs = ([ds.train_negatives[r][:per_image] for r in tr],
                          [ds.train_negative_sources[r][:per_image] for r in tr])
        else:
            from experiments.qformer_data import training_negatives

            negs, srcs = training_negatives(ds, tr, per_image)
        return {"hard_negative": [negs[g] for g in t2i], "hard_negative_source": [srcs[g] for g in t2i]}
    return {}


def run_variant(name: str, args, ds, grid, test_idx, seed: int) -> dict[str, Any]:
    from align.base import build_aligner, encode_in_batches
    from experiments.pairs import PairedDataset
    from experiments.trainer import TrainConfig, Trainer

    torch.manual_seed(seed)
    labels = np.asarray(ds.labels["shape_colour"])
    weights = dict(VARIANTS[name])
    if weights["itm_weight"] > 0:
        weights["itm_weight"] = args.itm_weight
    model = build_aligner("qformer", image_dim=int(grid.shape[-1]), num_queries=args.queries, num_layers=args.layers,
                          cross_every=args.cross_every,
                          max_text_len=args.max_text_len, itg_vocab=args.itg_vocab, grid_positions=args.grid_positions,
                          num_classes=int(labels.max()) + 1, model_dir=args.model_dir, rerank_k=args.k, **weights)
    tr = np.asarray(ds.splits["train"])
    texts = [t for i in tr for t in ds.captions[i]]
    t2i = np.repeat(np.arange(len(tr)), [len(ds.captions[i]) for i in tr])
    per_text: dict[str, Any] = {"text": texts, **_train_negatives(name, ds, tr, t2i, seed, args.train_negatives)}
    data = PairedDataset({"image": grid[tr], "label": labels[tr]}, per_text, t2i)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.05,
                      warmup_steps=max(1, args.steps // 15), grad_clip=1.0, seed=seed, progress=False,
                      device=args.device)
    t0 = time.perf_counter()
    Trainer(cfg).fit(model, data)
    train_s = time.perf_counter() - t0
    test_grid = np.asarray(grid[test_idx], dtype=np.float32)
    test_texts = [t for i in test_idx for t in ds.captions[i]]
    test_t2i = np.repeat(np.arange(len(test_idx)), [len(ds.captions[i]) for i in test_idx])
    res: dict[str, Any] = {"variant": name, "seed": seed, "train_seconds": train_s,
                           "params_trained": model.num_trainable_parameters()}
    # the shared evaluator's view: encode() (mean query embedding) and cosine
    img = encode_in_batches(model, "image", torch.from_numpy(test_grid), 256)
    txt = torch.cat([model.encode("text", test_texts[s:e]).float().cpu() for s, e in _chunks(len(test_texts), 256)])
    res["encode_rsum"] = retrieval_metrics(img, txt, test_t2i, progress=False)["rsum"]
    t0 = time.perf_counter()
    if VARIANTS[name]["itm_weight"] == 0:  # no trained ITM head: ITC only (re-ranking would be noise)
        itc = itc_score_matrix(model, test_grid, test_texts)
        res["itc"] = metrics_from_ranks(ranks_from_scores(itc, itc, test_t2i))
        res["itm_rerank"] = {"rsum": float("nan")}
    else:
        res.update(qformer_retrieval_metrics(model, test_grid, test_texts, test_t2i, k=args.k,
                                             batch_size=args.eval_batch_size))
    src = [s for i in test_idx for s in ds.hard_negative_sources[i]]
    neg = [s for i in test_idx for s in ds.hard_negatives[i]]
    owner = np.repeat(np.arange(len(test_idx)), [len(ds.hard_negatives[i]) for i in test_idx])
    res["hard_negatives"] = itm_hard_negative_metrics(model, test_grid, src, neg, owner, args.eval_batch_size)
    kinds = np.asarray([k for i in test_idx for k in ds.hard_negative_kinds[i]])
    if VARIANTS[name]["itm_weight"] == 0:
        res["hard_negatives"]["itm"] = res["hard_negatives"]["itm_per_image"] = float("nan")
    else:  # by kind of edit
        pos = itm_pair_scores(model, test_grid, src, owner, np.arange(len(owner)), args.eval_batch_size)
        ng = itm_pair_scores(model, test_grid, neg, owner, np.arange(len(owner)), args.eval_batch_size)
        res["hard_negatives"]["itm_by_kind"] = {str(k): float(100 * np.mean(pos[kinds == k] > ng[kinds == k]))
                                                for k in np.unique(kinds)}
        res["hard_negatives_train"] = _train_fit(model, ds, grid, args.eval_batch_size)
    res["eval_seconds"] = time.perf_counter() - t0
    if args.save:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(args.out) / f"{name}-seed{seed}.pt")
    return res


def _train_fit(model, ds, grid: Any, batch_size: int, n_scenes: int = 150, per_scene: int = 3) -> dict[str, float]:
    """ITM and ITC hard-negative accuracy on the training negatives of the first ``n_scenes`` training scenes (pairs
    the model was trained on): whether a low test figure is a failure to fit or to generalise."""
    rows = [int(r) for r in np.asarray(ds.splits["train"])[:n_scenes] if getattr(ds, "train_negatives", None)
            and ds.train_negatives[int(r)]]
    if not rows:
        return {}
    src = [s for r in rows for s in ds.train_negative_sources[r][:per_scene]]
    neg = [n for r in rows for n in ds.train_negatives[r][:per_scene]]
    owner = np.repeat(np.arange(len(rows)), [len(ds.train_negatives[r][:per_scene]) for r in rows])
    return itm_hard_negative_metrics(model, np.asarray(grid[rows], dtype=np.float32), src, neg, owner, batch_size)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n-scenes", type=int, default=1500)
    p.add_argument("--max-eval-images", type=int, default=150)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--cross-every", type=int, default=2, help="cross-attention in every n-th layer (BLIP-2: 2)")
    p.add_argument("--max-text-len", type=int, default=24)
    p.add_argument("--itg-vocab", default="batch", choices=["full", "batch"])
    p.add_argument("--itm-weight", type=float, default=1.0, help="weight of ITM in the variants that have it")
    p.add_argument("--grid-positions", type=int, default=256, help="learned grid position embeddings (0: none)")
    p.add_argument("--train-negatives", type=int, default=12, help="compositional negatives per training image (+neg)")
    p.add_argument("--encoder-size", type=int, default=None,
                   help="MobileNetV2 input size (256: the 8x8 grid; default: the scenes' 128 px, a 4x4 grid)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--device", default="auto", help="Trainer device: auto, cpu, cuda")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--model-dir", default=None, help="another MiniLM directory (default: the packaged one)")
    p.add_argument("--bundle", default=None, help="read data from this experiments.qformer_data bundle (.npz)")
    p.add_argument("--write-bundle", default=None, help="write the data bundle (.npz) here and exit")
    p.add_argument("--out", default="runs/qformer_ablation")
    p.add_argument("--save", action="store_true", help="also save each model's state dict")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.bundle:
        from experiments.qformer_data import load_bundle

        ds, grid = load_bundle(args.bundle)
        test_idx = np.asarray(ds.splits["test"])[: args.max_eval_images]
    else:
        ds, grid, test_idx = _data(args.n_scenes, args.max_eval_images, args.encoder_size)
    if args.write_bundle:
        from experiments.qformer_data import save_bundle

        print(save_bundle(args.write_bundle, ds, grid, args.train_negatives))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for name in args.variants:
            r = run_variant(name, args, ds, grid, test_idx, seed)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("variant", "seed", "train_seconds", "encode_rsum")}
                             | {"itc_rsum": r["itc"]["rsum"], "rerank_rsum": r["itm_rerank"]["rsum"],
                                "hard_neg": r["hard_negatives"], "hard_neg_train": r.get("hard_negatives_train")}),
                  flush=True)
            from align.weights import write_file_atomically

            blob = json.dumps({"args": vars(args), "runs": results}, indent=1).encode()
            write_file_atomically(out / "results.json", lambda f: f.write(blob))


if __name__ == "__main__":
    main()
