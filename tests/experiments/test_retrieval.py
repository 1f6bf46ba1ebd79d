"""experiments.retrieval against brute-force loops over the full score matrix."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from experiments import retrieval as R
from experiments.retrieval import (
    FaissRetriever,
    RetrievalEvaluator,
    caption_index,
    exact_topk,
    faiss_retrieval_metrics,
    faiss_vs_exact_recall,
    flatten_metrics,
    hard_negative_accuracy,
    hard_negative_metrics,
    metrics_from_ranks,
    recall_at_k_from_topk,
    retrieval_metrics,
    retrieval_ranks,
    rows_for_budget,
)


# ------------------------------------------------------------------------------------------
# brute force: plain loops over the full matrix, in float64
# ------------------------------------------------------------------------------------------

def brute_ranks(I, T, g, normalize=True):
    I = np.asarray(I, np.float64)
    T = np.asarray(T, np.float64)
    if normalize:
        I = I / np.maximum(np.linalg.norm(I, axis=1, keepdims=True), 1e-12)
        T = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
    S = T @ I.T  # [N_text, N_img]
    i2t, ap, t2i = [], [], []
    for i in range(len(I)):
        col = S[:, i]
        own = [j for j in range(len(T)) if g[j] == i]
        best = max(col[j] for j in own)
        i2t.append(1 + sum(1 for j in range(len(T)) if col[j] > best))
        precisions = []
        for c in own:
            rank = 1 + sum(1 for j in range(len(T)) if col[j] > col[c])
            hits = 1 + sum(1 for d in own if col[d] > col[c])
            precisions.append(hits / rank)
        ap.append(sum(precisions) / len(precisions))
    for j in range(len(T)):
        row = S[j]
        t2i.append(1 + sum(1 for i in range(len(I)) if row[i] > row[g[j]]))
    return np.array(i2t), np.array(t2i), np.array(ap)


def brute_metrics(i2t, t2i, ap, ks=(1, 5, 10)):
    out = {}
    for name, r, a in (("image_to_text", i2t, ap), ("text_to_image", t2i, 1.0 / t2i)):
        d = {f"R@{k}": 100.0 * np.mean(r <= k) for k in ks}
        d["median_rank"] = math.floor(np.median(r))
        d["mean_rank"] = float(np.mean(r))
        d["mAP"] = 100.0 * float(np.mean(a))
        out[name] = d
    out["rsum"] = sum(out[n][f"R@{k}"] for n in ("image_to_text", "text_to_image") for k in ks)
    return out


def shuffled_ground_truth(rng, n_images, caps_per_image=5):
    return rng.permutation(np.repeat(np.arange(n_images), caps_per_image))


@pytest.fixture(scope="module")
def tied_data():
    """Small integer embeddings (exact float32 arithmetic, many ties); image 0's captions rank last."""
    rng = np.random.default_rng(0)
    n_img, d = 30, 6
    g = shuffled_ground_truth(rng, n_img)
    I = rng.integers(-2, 3, size=(n_img, d)).astype(np.float32)
    T = np.clip(I[g] + rng.integers(-1, 2, size=(len(g), d)), -2, 2).astype(np.float32)
    I[0] = 0
    I[0, 0] = 1  # scores against image 0 are the first coordinate: others have >= -2 ...
    T[g == 0, 0] = -3  # ... its own captions -3, strictly below every other caption
    return I, T, g


@pytest.fixture(scope="module")
def tied_truth(tied_data):
    I, T, g = tied_data
    return brute_ranks(I, T, g, normalize=False)


@pytest.fixture(scope="module")
def float_data():
    rng = np.random.default_rng(1)
    n_img, d = 40, 16
    counts = rng.integers(1, 8, size=n_img)  # 1..7 captions per image
    g = rng.permutation(np.repeat(np.arange(n_img), counts))
    I = rng.standard_normal((n_img, d)).astype(np.float32)
    T = (I[g] + 1.2 * rng.standard_normal((len(g), d))).astype(np.float32)
    return I, T, g


# ------------------------------------------------------------------------------------------
# exact ranks and metrics
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 1, 7, 13, 149, 10_000])
def test_ranks_match_brute_force_with_ties(tied_data, tied_truth, chunk_size):
    I, T, g = tied_data
    i2t, t2i, ap = tied_truth
    r = retrieval_ranks(I, T, g, normalize=False, with_map=True, chunk_size=chunk_size)
    np.testing.assert_array_equal(r.image_to_text, i2t)
    np.testing.assert_array_equal(r.text_to_image, t2i)
    np.testing.assert_allclose(r.image_to_text_ap, ap, rtol=1e-12)
    assert len(T) % 7 and len(T) % 13 and len(T) % 149  # chunk sizes that do not divide N


def test_data_has_ties_and_a_last_ranked_image(tied_data, tied_truth):
    I, T, g = tied_data
    S = T.astype(np.float64) @ I.T.astype(np.float64)
    assert len(np.unique(S)) < S.size / 20  # heavily tied
    n_own = int((g == 0).sum())
    assert tied_truth[0][0] == len(T) - n_own + 1  # all of image 0's captions are ranked last
    r = retrieval_ranks(I, T, g, normalize=False, chunk_size=7)
    assert r.image_to_text[0] == len(T) - n_own + 1


def test_ranks_normalized_exact_ties():
    """±1 vectors have norm sqrt(D) = 4: normalising is exact, so ties stay exact ties."""
    rng = np.random.default_rng(2)
    n_img, d = 25, 16
    g = shuffled_ground_truth(rng, n_img)
    I = rng.choice([-1.0, 1.0], size=(n_img, d)).astype(np.float32)
    T = I[g].copy()
    flip = rng.random(T.shape) < 0.3
    T[flip] *= -1
    T[: len(T) // 4] = T[len(T) // 4 : len(T) // 2]  # exact duplicate captions
    i2t, t2i, ap = brute_ranks(I, T, g)
    r = retrieval_ranks(I * 3.0, T * 0.5, g, with_map=True, chunk_size=11)  # scale must not matter
    np.testing.assert_array_equal(r.image_to_text, i2t)
    np.testing.assert_array_equal(r.text_to_image, t2i)
    np.testing.assert_allclose(r.image_to_text_ap, ap, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 9])
def test_ranks_float_data_variable_captions(float_data, chunk_size):
    I, T, g = float_data
    i2t, t2i, ap = brute_ranks(I, T, g)
    r = retrieval_ranks(torch.from_numpy(I), torch.from_numpy(T), torch.from_numpy(g), with_map=True,
                        chunk_size=chunk_size)
    np.testing.assert_array_equal(r.image_to_text, i2t)
    np.testing.assert_array_equal(r.text_to_image, t2i)
    np.testing.assert_allclose(r.image_to_text_ap, ap, rtol=1e-12)


def test_small_true_pair_groups(float_data, monkeypatch):
    """Captions of one image split over several true-pair GEMMs, groups of few images."""
    I, T, g = float_data
    monkeypatch.setattr(R, "_PAIR_ROWS", 6)
    monkeypatch.setattr(R, "_PAIR_COLS", 3)
    i2t, t2i, ap = brute_ranks(I, T, g)
    r = retrieval_ranks(I, T, g, with_map=True, chunk_size=50)
    np.testing.assert_array_equal(r.image_to_text, i2t)
    np.testing.assert_array_equal(r.text_to_image, t2i)
    np.testing.assert_allclose(r.image_to_text_ap, ap, rtol=1e-12)


def test_repair_path_when_thresholds_differ_from_the_block_gemm(tied_data, tied_truth, monkeypatch):
    """If the up-front true-pair scores disagree with the block GEMM, every image is recomputed
    column-wise and the ranks are still exact."""
    I, T, g = tied_data
    real = R._true_pair_scores
    monkeypatch.setattr(R, "_true_pair_scores", lambda *a: np.nextafter(real(*a), np.float32(np.inf)))
    r = retrieval_ranks(I, T, g, normalize=False, with_map=True, chunk_size=7, memory_budget=5 * len(T) * 4)
    assert r.n_repaired == len(I)
    np.testing.assert_array_equal(r.image_to_text, tied_truth[0])
    np.testing.assert_array_equal(r.text_to_image, tied_truth[1])
    np.testing.assert_allclose(r.image_to_text_ap, tied_truth[2], rtol=1e-12)


def test_metrics_match_brute_force(tied_data, tied_truth):
    I, T, g = tied_data
    ref = brute_metrics(*tied_truth)
    out = retrieval_metrics(I, T, g, normalize=False, with_map=True)
    for name in ("image_to_text", "text_to_image"):
        for key, value in ref[name].items():
            assert out[name][key] == pytest.approx(value, abs=1e-9), (name, key)
        assert out[name]["n_queries"] == (len(I) if name == "image_to_text" else len(T))
    assert out["rsum"] == pytest.approx(ref["rsum"])
    plain = retrieval_metrics(I, T, g, normalize=False)
    assert "mAP" not in plain["image_to_text"]
    custom = retrieval_metrics(I, T, g, (2, 3), normalize=False)
    assert set(k for k in custom["text_to_image"] if k.startswith("R@")) == {"R@2", "R@3"}
    assert custom["rsum"] == pytest.approx(sum(custom[d][f"R@{k}"] for d in R.DIRECTIONS for k in (2, 3)))


def test_normalize_flag_changes_scores():
    rng = np.random.default_rng(3)
    g = shuffled_ground_truth(rng, 20, 3)
    I = rng.standard_normal((20, 8)).astype(np.float32) * rng.uniform(0.1, 10, (20, 1)).astype(np.float32)
    T = (I[g] + rng.standard_normal((60, 8))).astype(np.float32)
    for normalize in (True, False):
        i2t, t2i, _ = brute_ranks(I, T, g, normalize=normalize)
        r = retrieval_ranks(I, T, g, normalize=normalize)
        np.testing.assert_array_equal(r.image_to_text, i2t)
        np.testing.assert_array_equal(r.text_to_image, t2i)


def test_inputs_are_not_modified(float_data):
    I, T, g = float_data
    It, Tt = torch.from_numpy(I.copy()), torch.from_numpy(T.copy())
    retrieval_ranks(It, Tt, g)
    assert torch.equal(It, torch.from_numpy(I)) and torch.equal(Tt, torch.from_numpy(T))


def test_memory_budget_sets_block_rows(float_data, tied_truth, tied_data):
    assert rows_for_budget(1000, 5 * 1000 * 12) == 12
    assert rows_for_budget(1000, 1) == 1
    I, T, g = tied_data
    r = retrieval_ranks(I, T, g, normalize=False, memory_budget=5 * len(I) * 11)  # 11-row blocks
    np.testing.assert_array_equal(r.text_to_image, tied_truth[1])


def test_bootstrap_ci_contains_point_estimate_and_is_seeded(float_data):
    I, T, g = float_data
    a = retrieval_metrics(I, T, g, with_map=True, bootstrap=300, ci=0.9, seed=4)
    b = retrieval_metrics(I, T, g, with_map=True, bootstrap=300, ci=0.9, seed=4)
    assert a == b
    assert a["bootstrap"] == 300 and a["ci"] == 0.9
    for name in R.DIRECTIONS:
        for key in ("R@1", "R@5", "R@10", "median_rank", "mean_rank", "mAP"):
            lo, hi, v = a[name][f"{key}_ci_low"], a[name][f"{key}_ci_high"], a[name][key]
            assert lo <= v <= hi, (name, key, lo, v, hi)
    assert a["rsum_ci_low"] <= a["rsum"] <= a["rsum_ci_high"]
    assert a["image_to_text"]["R@1_ci_low"] < a["image_to_text"]["R@1_ci_high"]  # not degenerate
    c = retrieval_metrics(I, T, g, bootstrap=300, ci=0.9, seed=5)
    assert c["rsum_ci_low"] != a["rsum_ci_low"] or c["rsum_ci_high"] != a["rsum_ci_high"]


def test_flatten_metrics():
    nested = {"image_to_text": {"R@1": 50.0, "n_queries": 3}, "text_to_image": {"R@1": 25.0}, "rsum": 75.0,
              "note": "skipped"}
    assert flatten_metrics(nested) == {"i2t/R@1": 50.0, "i2t/n_queries": 3.0, "t2i/R@1": 25.0, "rsum": 75.0}
    assert flatten_metrics({"rsum": 1}, prefix="val/") == {"val/rsum": 1.0}


def test_metrics_from_ranks_defaults():
    ranks = R.RetrievalRanks(image_to_text=np.array([1, 2, 30]), text_to_image=np.array([1, 1, 6, 11]))
    out = metrics_from_ranks(ranks)
    assert out["image_to_text"]["R@1"] == pytest.approx(100 / 3)
    assert out["image_to_text"]["median_rank"] == 2
    assert out["text_to_image"]["median_rank"] == 3  # floor(median([1, 1, 6, 11]) = 3.5)
    assert out["text_to_image"]["R@5"] == 50.0 and out["text_to_image"]["R@10"] == 75.0


# ------------------------------------------------------------------------------------------
# evaluator for the Trainer
# ------------------------------------------------------------------------------------------

class TwoTowers(nn.Module):
    modalities = ("image", "text")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 6)
        self.text = nn.Linear(9, 6)

    def encode(self, modality, x):
        return getattr(self, modality)(x)


def test_evaluator_encodes_in_batches_and_returns_flat_floats():
    rng = np.random.default_rng(5)
    g = shuffled_ground_truth(rng, 15, 3)
    images, texts = torch.randn(15, 12), torch.randn(45, 9)
    model = TwoTowers().train()
    ev = RetrievalEvaluator(images, texts, g, ks=(1, 5), batch_size=4)
    out = ev(model)
    assert model.training  # restored by encode_in_batches
    with torch.no_grad():
        ref = flatten_metrics(retrieval_metrics(model.image(images), model.text(texts), g, (1, 5)))
    assert out == pytest.approx(ref)
    assert {"i2t/R@1", "i2t/R@5", "t2i/R@1", "t2i/median_rank", "i2t/mean_rank", "rsum"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="text_inputs has 44 rows but text_to_image has 45"):
        RetrievalEvaluator(images, texts[:44], g)


# ------------------------------------------------------------------------------------------
# faiss
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faiss_data():
    rng = np.random.default_rng(6)
    n_img, d = 300, 32
    g = shuffled_ground_truth(rng, n_img, 5)
    I = rng.standard_normal((n_img, d)).astype(np.float32)
    T = (I[g] + 1.5 * rng.standard_normal((len(g), d))).astype(np.float32)
    return I, T, g


def test_faiss_flat_equals_exact_search(faiss_data):
    I, T, g = faiss_data
    flat = FaissRetriever("flat")
    flat.add(I[:100]).add(I[100:])  # add in pieces
    assert flat.ntotal == len(I)
    scores, idx = flat.search(T, 10)
    ex_scores, ex_idx = exact_topk(T, I, 10)
    assert faiss_vs_exact_recall(idx, ex_idx) == 100.0
    np.testing.assert_allclose(scores, ex_scores, atol=1e-5)
    # R@K from the flat top-k equals the exact evaluator's (continuous data: no ties)
    exact = retrieval_metrics(I, T, g)
    recalls = ("R@1", "R@5", "R@10")
    assert recall_at_k_from_topk(idx, g) == pytest.approx({k: exact["text_to_image"][k] for k in recalls})
    _, i2t_idx = FaissRetriever("flat").add(T).search(I, 10)
    assert recall_at_k_from_topk(i2t_idx, caption_index(g, len(I))) == pytest.approx(
        {k: exact["image_to_text"][k] for k in recalls})
    both = faiss_retrieval_metrics(I, T, g, compare_exact=True)
    assert both["rsum"] == pytest.approx(exact["rsum"])
    assert both["faiss_vs_exact"] == {"image_to_text": 100.0, "text_to_image": 100.0}


def test_faiss_approximate_indexes_report_recall(faiss_data):
    I, T, _ = faiss_data
    exact = exact_topk(I, T, 10)[1]
    recall = {}
    for nprobe in (1, 3, 8):
        _, idx = FaissRetriever("ivf", nlist=8, nprobe=nprobe).add(T).search(I, 10)
        assert idx.shape == (len(I), 10) and idx.dtype == np.int64
        recall[nprobe] = faiss_vs_exact_recall(idx, exact)
    assert 0 < recall[1] < recall[3] < recall[8] == 100.0  # probing every list is exhaustive
    _, idx = FaissRetriever("hnsw", hnsw_m=16, ef_construction=64, ef_search=64).add(T).search(I, 10)
    assert 90.0 < faiss_vs_exact_recall(idx, exact) <= 100.0


def test_recall_at_k_from_topk_and_overlap_by_hand():
    topk = np.array([[3, 1, 2], [0, 1, 2], [5, 6, 7]])
    assert recall_at_k_from_topk(topk, np.array([1, 0, 9]), ks=(1, 2)) == pytest.approx(
        {"R@1": 100 / 3, "R@2": 200 / 3})
    targets = np.array([[9, 2], [7, -1], [-1, -1]])  # padded multi-target rows
    assert recall_at_k_from_topk(topk, targets, ks=(1, 3)) == pytest.approx({"R@1": 0.0, "R@3": 100 / 3})
    assert faiss_vs_exact_recall(np.array([[1, 2], [3, 4]]), np.array([[2, 9], [4, 3]])) == 75.0
    with pytest.raises(ValueError, match="R@5 needs top-5"):
        recall_at_k_from_topk(topk, np.array([1, 0, 9]), ks=(5,))


def test_faiss_errors(faiss_data):
    I, T, _ = faiss_data
    with pytest.raises(ValueError, match="unknown faiss index kind 'lsh'"):
        FaissRetriever("lsh")
    with pytest.raises(ValueError, match="before add"):
        FaissRetriever().search(I, 5)
    f = FaissRetriever().add(I)
    with pytest.raises(ValueError, match="queries has dim 31 but the index holds dim 32"):
        f.search(T[:, :31], 5)
    bad = T.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="queries has non-finite values.*row 4"):
        f.search(bad, 5)


# ------------------------------------------------------------------------------------------
# hard negatives
# ------------------------------------------------------------------------------------------

def brute_hard_negatives(I, P, negs, owner):
    norm = lambda v: np.asarray(v, np.float64) / np.linalg.norm(v)  # noqa: E731
    pairs, lost = [], set()
    for n, o in zip(negs, owner):
        win = float(norm(I[o]) @ norm(P[o])) > float(norm(I[o]) @ norm(n))
        pairs.append(win)
        if not win:
            lost.add(int(o))
    owners = set(int(o) for o in owner)
    return 100.0 * np.mean(pairs), 100.0 * (len(owners) - len(lost)) / len(owners)


def test_hard_negative_accuracy_matches_brute_force():
    rng = np.random.default_rng(7)
    n, k, d = 30, 4, 8
    I = rng.standard_normal((n, d)).astype(np.float32)
    P = (I + 0.8 * rng.standard_normal((n, d))).astype(np.float32)
    N = (I[:, None] + 1.0 * rng.standard_normal((n, k, d))).astype(np.float32)
    N[0, 1] = P[0] * 2.0  # a tie after normalising: the true caption does not outscore it
    owner = np.repeat(np.arange(n), k)
    pair, image = brute_hard_negatives(I, P, N.reshape(-1, d), owner)
    m = hard_negative_metrics(I, P, N)
    assert m["per_pair"] == pytest.approx(pair) and m["per_image"] == pytest.approx(image)
    assert m["n_pairs"] == n * k and m["n_images"] == n
    assert hard_negative_accuracy(I, P, N) == pytest.approx(pair)  # the headline is per pair
    assert hard_negative_accuracy(I, P, N, per="image") == pytest.approx(image)
    assert 0 < image < pair < 100
    # flat negatives with an owner index; some images without negatives
    keep = rng.random(n * k) < 0.5
    flat, own = N.reshape(-1, d)[keep], owner[keep]
    pair, image = brute_hard_negatives(I, P, flat, own)
    m = hard_negative_metrics(I, P, torch.from_numpy(flat), torch.from_numpy(own))
    assert m["per_pair"] == pytest.approx(pair) and m["per_image"] == pytest.approx(image)
    assert m["n_images"] == len(set(own.tolist()))


def test_hard_negative_bad_inputs():
    I, P = np.ones((3, 4), np.float32), np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"neg_text_emb must be \[N=3, K, D=4\]"):
        hard_negative_metrics(I, P, np.ones((2, 2, 4)))
    with pytest.raises(ValueError, match=r"neg_owner\[1\] = 3 is out of range for 3 images"):
        hard_negative_metrics(I, P, np.ones((2, 4)), np.array([0, 3]))
    with pytest.raises(ValueError, match="neg_text_emb has 2 rows but neg_owner has 1"):
        hard_negative_metrics(I, P, np.ones((2, 4)), np.array([0]))
    with pytest.raises(ValueError, match="image_emb has shape"):
        hard_negative_metrics(I, P[:2], np.ones((3, 1, 4)))
    bad = np.ones((3, 2, 4), np.float32)
    bad[2, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"neg_text_emb has non-finite values \(NaN or Inf\), first at \[2, 1\]"):
        hard_negative_metrics(I, P, bad)
    with pytest.raises(ValueError, match="neg_text_emb has non-finite values .* first at row 5"):
        hard_negative_metrics(I, P, bad.reshape(6, 4), np.repeat(np.arange(3), 2))
    with pytest.raises(ValueError, match="per must be"):
        hard_negative_accuracy(I, P, np.ones((3, 1, 4)), per="caption")


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------

def _ok():
    I = np.ones((3, 4), np.float32)
    T = np.ones((6, 4), np.float32)
    g = np.array([0, 1, 2, 0, 1, 2])
    return I, T, g


@pytest.mark.parametrize("mutate,message", [
    (lambda I, T, g: (I, T, g[:5]), "text_emb has 6 rows but text_to_image has 5"),
    (lambda I, T, g: (I, T, np.array([0, 1, 2, 0, 1, 3])), r"text_to_image\[5\] = 3 is out of range for 3 images"),
    (lambda I, T, g: (I, T, np.array([0, -1, 2, 0, 1, 2])), r"text_to_image\[1\] = -1 is out of range"),
    (lambda I, T, g: (I, T, np.array([0, 1, 0, 0, 1, 1])), "image row 2 of image_emb has no caption"),
    (lambda I, T, g: (I, T, g.astype(np.float64)), "text_to_image must hold integer indices"),
    (lambda I, T, g: (I, T, g[:, None]), "text_to_image must be a 1-D integer array"),
    (lambda I, T, g: (I[0], T, g), r"image_emb must be 2-D \[N_images, D\], got shape \(4,\)"),
    (lambda I, T, g: (I, T[None], g), r"text_emb must be 2-D \[N_texts, D\]"),
    (lambda I, T, g: (I, T[:, :3], g), "image_emb has dim 4 but text_emb has dim 3"),
    (lambda I, T, g: (I[:0], T, g), "image_emb is empty"),
    (lambda I, T, g: (np.where(np.arange(3)[:, None] == 2, np.nan, I), T, g),
     r"image_emb has non-finite values \(NaN or Inf\), first in row 2"),
    (lambda I, T, g: (I, np.where(np.arange(6)[:, None] >= 4, np.inf, T), g),
     "text_emb has non-finite values .* first in row 4"),
])
def test_bad_inputs_raise_clear_errors(mutate, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(*mutate(*_ok()))


def test_bad_options():
    I, T, g = _ok()
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(I, T, g, ks=(0, 5))
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        retrieval_metrics(I, T, g, bootstrap=-1)
    with pytest.raises(ValueError, match=r"ci must be in \(0, 1\)"):
        retrieval_metrics(I, T, g, bootstrap=10, ci=95)
    with pytest.raises(ValueError, match="T.npy has 6 rows but M.npy has 5"):
        retrieval_metrics(I, T, g[:5], input_names=("I.npy", "T.npy", "M.npy"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ranks_on_gpu_match_brute_force(tied_data, tied_truth):
    I, T, g = tied_data
    r = retrieval_ranks(torch.from_numpy(I).cuda(), torch.from_numpy(T).cuda(), g, normalize=False,
                        with_map=True, chunk_size=7)
    np.testing.assert_array_equal(r.image_to_text, tied_truth[0])
    np.testing.assert_array_equal(r.text_to_image, tied_truth[1])
    np.testing.assert_allclose(r.image_to_text_ap, tied_truth[2], rtol=1e-12)
