"""experiments.retrieval: faiss top-k search and compositional hard negatives."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.retrieval import (
    FaissRetriever,
    caption_index,
    exact_topk,
    faiss_retrieval_metrics,
    faiss_vs_exact_recall,
    hard_negative_accuracy,
    hard_negative_metrics,
    recall_at_k_from_topk,
    retrieval_metrics,
)


def shuffled_ground_truth(rng, n_images, caps_per_image=5):
    return rng.permutation(np.repeat(np.arange(n_images), caps_per_image))


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
