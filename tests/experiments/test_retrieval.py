"""experiments.retrieval against a brute-force float64 reference with ties, in every tie mode."""
from __future__ import annotations

import itertools
import logging
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from experiments import retrieval as R
from experiments.retrieval import (
    RetrievalEvaluator,
    flatten_metrics,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    rows_for_budget,
)

MODES = ("expected", "pessimistic", "optimistic")
KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------
# brute force: the full float64 score matrix, then every query by hand
# ------------------------------------------------------------------------------------------

def exact_scores(I, T, normalize=True):
    """[N_text, N_img] float64 scores (rows normalised in float64; zero rows stay zero)."""
    def prep(x):
        x = np.asarray(x, np.float64)
        if normalize:
            n = np.sqrt((x * x).sum(1, keepdims=True))
            x = x / np.where(n == 0, 1.0, n)
        return x
    I, T = prep(I), prep(T)
    return (T[:, None, :] * I[None, :, :]).sum(-1)


def brute_query(scores, true, ks=KS, max_arrangements=20000):
    """Rank, hit@k and AP of one query in every mode. Rank and hits from the distribution of the
    first true position in its tie block, P(first = p) = C(g - p, t - 1) / C(g, t); AP by
    enumerating every placement of the true items in their tie blocks (None when too many)."""
    true = set(int(j) for j in true)
    values = sorted(set(scores.tolist()), reverse=True)
    blocks = [[j for j in range(len(scores)) if scores[j] == v] for v in values]
    out = {m: {} for m in MODES}
    s = 0
    for b in blocks:
        t = sum(j in true for j in b)
        if t:
            g = len(b)
            break
        s += len(b)
    dist = {p: Fraction(math.comb(g - p, t - 1), math.comb(g, t)) for p in range(1, g - t + 2)}
    out["expected"]["rank"] = float(s + sum(p * q for p, q in dist.items()))
    out["optimistic"]["rank"] = s + 1
    out["pessimistic"]["rank"] = s + g - t + 1
    for k in ks:
        out["expected"][k] = float(sum(q for p, q in dist.items() if s + p <= k))
        for m in ("optimistic", "pessimistic"):
            out[m][k] = float(out[m]["rank"] <= k)
    # AP: each block's true items placed every possible way
    layout = [(len(b), sum(j in true for j in b)) for b in blocks]
    if math.prod(math.comb(gb, tb) for gb, tb in layout) > max_arrangements:
        for m in MODES:
            out[m]["ap"] = None
        return out
    choices = [list(itertools.combinations(range(gb), tb)) for gb, tb in layout]
    aps = []
    for pick in itertools.product(*choices):
        hits, pos, prec = 0, 0, []
        for (gb, _), chosen in zip(layout, pick):
            for q in range(gb):
                pos += 1
                if q in chosen:
                    hits += 1
                    prec.append(hits / pos)
        aps.append(sum(prec) / len(true))
    out["expected"]["ap"] = float(np.mean(aps))
    out["optimistic"]["ap"], out["pessimistic"]["ap"] = max(aps), min(aps)
    return out


def brute(I, T, g, normalize=True):
    """{mode: {"i2t": {"rank", k, "ap"}: arrays, "t2i": ...}} from the full float64 matrix."""
    S = exact_scores(I, T, normalize)
    per = {"i2t": [brute_query(S[:, i], np.flatnonzero(g == i)) for i in range(S.shape[1])],
           "t2i": [brute_query(S[j], [g[j]]) for j in range(S.shape[0])]}
    return {m: {d: {key: [q[m][key] for q in qs] for key in ("rank", "ap", *KS)} for d, qs in per.items()}
            for m in MODES}


def check_against(ref, I, T, g, mode, **kw):
    r = retrieval_ranks(I, T, g, ties=mode, with_map=True, **kw)
    np.testing.assert_allclose(r.image_to_text, ref[mode]["i2t"]["rank"], rtol=1e-12)
    np.testing.assert_allclose(r.text_to_image, ref[mode]["t2i"]["rank"], rtol=1e-12)
    for k in KS:
        np.testing.assert_allclose(r.image_to_text_counts.hit(k, mode), ref[mode]["i2t"][k], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r.text_to_image_counts.hit(k, mode), ref[mode]["t2i"][k], rtol=1e-9, atol=1e-12)
    ap = np.array([np.nan if a is None else a for a in ref[mode]["i2t"]["ap"]])
    known = ~np.isnan(ap)
    assert known.sum() >= 5  # enough images' AP was enumerated
    np.testing.assert_allclose(r.image_to_text_ap[known], ap[known], rtol=1e-9)
    return r


def shuffled_ground_truth(rng, n_images, caps_per_image=5):
    return rng.permutation(np.repeat(np.arange(n_images), caps_per_image))


@pytest.fixture(scope="module")
def tied_data():
    """Small integer embeddings (exact arithmetic, many ties); image 0's captions rank last."""
    rng = np.random.default_rng(0)
    n_img, d = 30, 6
    g = shuffled_ground_truth(rng, n_img)
    I = rng.integers(-2, 3, size=(n_img, d)).astype(np.float32)
    T = np.clip(I[g] + rng.integers(-1, 2, size=(len(g), d)), -2, 2).astype(np.float32)
    I[0] = 0
    I[0, 0] = 1  # scores against image 0 are the first coordinate: others have >= -2 ...
    T[g == 0, 0] = -3  # ... its own captions -3, strictly below every other caption
    T[g == 0, 1:] = rng.integers(-2, 3, size=(int((g == 0).sum()), d - 1))
    return I, T, g


@pytest.fixture(scope="module")
def tied_truth(tied_data):
    return brute(*tied_data, normalize=False)


@pytest.fixture(scope="module")
def dup_data():
    """Continuous data with duplicated captions (of the same and of other images) and images."""
    rng = np.random.default_rng(1)
    n_img, d = 24, 8
    counts = rng.integers(1, 6, size=n_img)
    g = rng.permutation(np.repeat(np.arange(n_img), counts))
    I = rng.standard_normal((n_img, d)).astype(np.float32)
    T = (I[g] + 1.0 * rng.standard_normal((len(g), d))).astype(np.float32)
    I[5] = I[3]  # duplicated image
    I[7] = 2.5 * I[3]  # the same direction, another scale
    T[10] = T[11]  # duplicated captions (maybe of different images)
    same = np.flatnonzero(g == g[0])
    if len(same) > 1:
        T[same[1]] = T[same[0]]  # two identical captions of one image
    T[20:23] = T[30]
    return I, T, g


# ------------------------------------------------------------------------------------------
# ranks, hits and AP in every tie mode
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size,precision,torch_counting", [
    (None, "fp32", False), (7, "fp32", False), (13, "bf16", False), (1, "fp32", True), (149, "bf16", True)])
def test_tied_integer_data_matches_brute_force(tied_data, tied_truth, mode, chunk_size, precision, torch_counting):
    I, T, g = tied_data
    r = check_against(tied_truth, I, T, g, mode, normalize=False, chunk_size=chunk_size, precision=precision,
                      _torch_counting=torch_counting)
    assert r.precision == precision
    assert len(T) % 7 and len(T) % 13  # chunk sizes that do not divide N


def test_tied_data_is_tied_and_image_0_ranks_last(tied_data, tied_truth):
    I, T, g = tied_data
    S = exact_scores(I, T, normalize=False)
    assert len(np.unique(S)) < S.size / 20
    n_own = int((g == 0).sum())
    for mode in MODES:
        assert tied_truth[mode]["i2t"]["rank"][0] == len(T) - n_own + 1  # strictly below every other caption
    r = retrieval_ranks(I, T, g, normalize=False, ties="optimistic")
    assert r.image_to_text[0] == len(T) - n_own + 1
    tied = np.mean(r.text_to_image_counts.is_tied())
    assert 0.3 < tied <= 1.0


@pytest.mark.parametrize("mode", MODES)
def test_duplicated_captions_and_images(dup_data, mode):
    I, T, g = dup_data
    ref = brute(I, T, g)
    r = check_against(ref, I, T, g, mode, chunk_size=9)
    # the duplicated image ties for every caption of images 3 and 5 (image 7, the same direction
    # at another scale, ties only if float64 normalisation happens to round both alike)
    j = np.flatnonzero(g == 3)[0]
    assert r.text_to_image_counts.tied[j] >= 2
    assert r.text_to_image_counts.is_tied()[j]


def test_normalized_exact_ties_are_scale_free():
    """±1 vectors have norm sqrt(D) = 4: normalising is exact, so ties stay ties at any scale."""
    rng = np.random.default_rng(2)
    n_img, d = 25, 16
    g = shuffled_ground_truth(rng, n_img)
    I = rng.choice([-1.0, 1.0], size=(n_img, d)).astype(np.float32)
    T = I[g].copy()
    T[rng.random(T.shape) < 0.3] *= -1
    T[: len(T) // 4] = T[len(T) // 4 : len(T) // 2]
    ref = brute(I, T, g)
    for mode in MODES:
        check_against(ref, I * 3.0, T * 0.5, g, mode, chunk_size=11)


def test_collapsed_embeddings_score_exactly_chance():
    """The issue's example: every image and caption identical."""
    g = np.repeat(np.arange(100), 5)
    exp = retrieval_metrics(np.ones((100, 16)), np.ones((500, 16)), g)
    for k in KS:
        assert exp["text_to_image"][f"R@{k}"] == pytest.approx(k, rel=1e-12)  # k of 100 images
        miss = math.comb(495, k) / math.comb(500, k)  # none of 5 true among the first k of 500
        assert exp["image_to_text"][f"R@{k}"] == pytest.approx(100 * (1 - miss), rel=1e-12)
    assert exp["text_to_image"]["mean_rank"] == pytest.approx(50.5)
    assert exp["image_to_text"]["mean_rank"] == pytest.approx(501 / 6)
    assert exp["text_to_image"]["tied_fraction"] == 1.0 and exp["image_to_text"]["tied_fraction"] == 1.0
    assert exp["rsum"] < 32
    opt = retrieval_metrics(np.ones((100, 16)), np.ones((500, 16)), g, ties="optimistic")
    assert opt["rsum"] == 600.0  # the old convention, kept as an option
    pes = retrieval_metrics(np.ones((100, 16)), np.ones((500, 16)), g, ties="pessimistic")
    assert pes["rsum"] == 0.0 and pes["text_to_image"]["mean_rank"] == 100
    assert pes["image_to_text"]["mean_rank"] == 496


def test_zeroed_rows_no_longer_help():
    """Zeroing half the image rows of a trained model used to raise image->text R@1."""
    rng = np.random.default_rng(3)
    g = shuffled_ground_truth(rng, 60)
    I = rng.standard_normal((60, 16)).astype(np.float32)
    T = (I[g] + 1.5 * rng.standard_normal((300, 16))).astype(np.float32)
    before = retrieval_metrics(I, T, g)
    Z = I.copy()
    Z[::2] = 0
    with pytest.raises(ValueError, match=r"image_emb has zero-norm rows .* first in row 0 \(30 of 60\)"):
        retrieval_metrics(Z, T, g)
    after = retrieval_metrics(Z, T, g, degenerate="tie")
    assert after["image_to_text"]["R@1"] < before["image_to_text"]["R@1"]
    assert after["image_to_text"]["tied_fraction"] == pytest.approx(0.5)
    ref = brute(Z, T, g)
    r = retrieval_ranks(Z, T, g, degenerate="tie")
    np.testing.assert_allclose(r.image_to_text, ref["expected"]["i2t"]["rank"], rtol=1e-12)
    np.testing.assert_allclose(r.text_to_image, ref["expected"]["t2i"]["rank"], rtol=1e-12)
    T0 = T.copy()
    T0[7] = 0
    with pytest.raises(ValueError, match="T.npy has zero-norm rows .* first in row 7"):
        retrieval_metrics(I, T0, g, input_names=("I.npy", "T.npy", "M.npy"))


def test_tied_fraction_warning(caplog):
    rng = np.random.default_rng(4)
    g = shuffled_ground_truth(rng, 40, 2)
    I = rng.standard_normal((40, 8)).astype(np.float32)
    T = (I[g] + rng.standard_normal((80, 8))).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="experiments.retrieval"):
        clean = retrieval_metrics(I, T, g)
    assert clean["text_to_image"]["tied_fraction"] == 0.0 and not caplog.records
    I[1] = I[0]
    with caplog.at_level(logging.WARNING, logger="experiments.retrieval"):
        tied = retrieval_metrics(I, T, g)
    assert tied["text_to_image"]["tied_fraction"] == pytest.approx(4 / 80)
    assert any("text_to_image" in rec.getMessage() and "5.0%" in rec.getMessage() for rec in caplog.records)


def test_metrics_match_brute_force(tied_data, tied_truth):
    I, T, g = tied_data
    for mode in MODES:
        out = retrieval_metrics(I, T, g, normalize=False, with_map=True, ties=mode)
        assert out["ties"] == mode
        for name, d in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            ref = tied_truth[mode][d]
            for k in KS:
                assert out[name][f"R@{k}"] == pytest.approx(100 * np.mean(ref[k]), abs=1e-9), (mode, name, k)
            assert out[name]["mean_rank"] == pytest.approx(np.mean(ref["rank"]))
            assert out[name]["median_rank"] == math.floor(np.median(ref["rank"]))
        assert out["rsum"] == pytest.approx(sum(out[n][f"R@{k}"] for n in R.DIRECTIONS for k in KS))
    custom = retrieval_metrics(I, T, g, (2, 3), normalize=False)
    assert set(k for k in custom["text_to_image"] if k.startswith("R@")) == {"R@2", "R@3"}


def test_text_to_image_ap_is_expected_inverse_rank(tied_data):
    I, T, g = tied_data
    S = exact_scores(I, T, normalize=False)
    r = retrieval_ranks(I, T, g, normalize=False, with_map=True)
    for j in range(0, len(T), 7):
        s = int((S[j] > S[j, g[j]]).sum())
        t = int((S[j] == S[j, g[j]]).sum())
        assert r.text_to_image_ap[j] == pytest.approx(np.mean([1 / (s + p) for p in range(1, t + 1)]), rel=1e-12)


def test_random_data_matches_brute_force_both_precisions():
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 8, size=40)
    g = rng.permutation(np.repeat(np.arange(40), counts))
    I = rng.standard_normal((40, 16)).astype(np.float32)
    T = (I[g] + 1.2 * rng.standard_normal((len(g), 16))).astype(np.float32)
    ref = brute(I, T, g)
    for precision in ("fp32", "bf16"):
        r = check_against(ref, torch.from_numpy(I), torch.from_numpy(T), torch.from_numpy(g), "expected",
                          chunk_size=9, precision=precision)
        assert r.n_rescored > 0 or precision == "fp32"


def test_inputs_are_not_modified():
    rng = np.random.default_rng(6)
    I, T = rng.standard_normal((10, 4)).astype(np.float32), rng.standard_normal((20, 4)).astype(np.float32)
    It, Tt = torch.from_numpy(I.copy()), torch.from_numpy(T.copy())
    retrieval_ranks(It, Tt, np.repeat(np.arange(10), 2))
    assert torch.equal(It, torch.from_numpy(I)) and torch.equal(Tt, torch.from_numpy(T))


def test_memory_budget_sets_block_rows(tied_data, tied_truth):
    assert rows_for_budget(1000, 5 * 1000 * 12) == 12
    assert rows_for_budget(1000, 1) == 1
    I, T, g = tied_data
    r = retrieval_ranks(I, T, g, normalize=False, memory_budget=5 * len(I) * 11, precision="fp32")
    np.testing.assert_allclose(r.text_to_image, tied_truth["expected"]["t2i"]["rank"], rtol=1e-12)


def test_bootstrap_ci_contains_point_estimate_and_is_seeded(dup_data):
    I, T, g = dup_data
    a = retrieval_metrics(I, T, g, with_map=True, bootstrap=300, ci=0.9, seed=4)
    b = retrieval_metrics(I, T, g, with_map=True, bootstrap=300, ci=0.9, seed=4)
    assert a == b
    assert a["bootstrap"] == 300 and a["ci"] == 0.9
    for name in R.DIRECTIONS:
        for key in ("R@1", "R@5", "R@10", "median_rank", "mean_rank", "mAP"):
            lo, hi, v = a[name][f"{key}_ci_low"], a[name][f"{key}_ci_high"], a[name][key]
            assert lo <= v <= hi, (name, key, lo, v, hi)
    assert a["rsum_ci_low"] <= a["rsum"] <= a["rsum_ci_high"]
    assert a["image_to_text"]["R@1_ci_low"] < a["image_to_text"]["R@1_ci_high"]
    c = retrieval_metrics(I, T, g, bootstrap=300, ci=0.9, seed=5)
    assert c["rsum_ci_low"] != a["rsum_ci_low"] or c["rsum_ci_high"] != a["rsum_ci_high"]


def test_flatten_metrics():
    nested = {"image_to_text": {"R@1": 50.0, "n_queries": 3}, "text_to_image": {"R@1": 25.0}, "rsum": 75.0,
              "ties": "expected"}
    assert flatten_metrics(nested) == {"i2t/R@1": 50.0, "i2t/n_queries": 3.0, "t2i/R@1": 25.0, "rsum": 75.0}
    assert flatten_metrics({"rsum": 1}, prefix="val/") == {"val/rsum": 1.0}


def test_metrics_from_ranks_built_elsewhere():
    """Ranks without tie counts (e.g. experiments.qformer_eval) are taken as they are."""
    ranks = R.RetrievalRanks(image_to_text=np.array([1, 2, 30]), text_to_image=np.array([1, 1, 6, 11]))
    out = metrics_from_ranks(ranks)
    assert out["image_to_text"]["R@1"] == pytest.approx(100 / 3)
    assert out["image_to_text"]["median_rank"] == 2
    assert out["text_to_image"]["median_rank"] == 3  # floor(median([1, 1, 6, 11]) = 3.5)
    assert out["text_to_image"]["R@5"] == 50.0 and out["text_to_image"]["R@10"] == 75.0
    assert "tied_fraction" not in out["text_to_image"] and "ties" not in out


@pytest.mark.parametrize("mode", MODES)
def test_ranks_from_score_matrices_equal_the_evaluator(dup_data, mode):
    I, T, g = dup_data
    S = exact_scores(I, T).T  # [N_img, N_text]
    a = R.ranks_from_scores(S, S, g, ties=mode)
    b = retrieval_ranks(I, T, g, ties=mode)
    np.testing.assert_allclose(a.image_to_text, b.image_to_text, rtol=1e-12)
    np.testing.assert_allclose(a.text_to_image, b.text_to_image, rtol=1e-12)
    assert flatten_metrics(metrics_from_ranks(a)) == pytest.approx(flatten_metrics(metrics_from_ranks(b)))
    flat = R.ranks_from_scores(np.zeros((4, 8)), np.zeros((4, 8)), np.repeat(np.arange(4), 2), ties=mode)
    assert metrics_from_ranks(flat, ks=(1,))["text_to_image"]["R@1"] == pytest.approx(
        {"expected": 25.0, "pessimistic": 0.0, "optimistic": 100.0}[mode])


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
    assert {"i2t/R@1", "i2t/R@5", "t2i/R@1", "t2i/median_rank", "i2t/tied_fraction", "rsum"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="text_inputs has 44 rows but text_to_image has 45"):
        RetrievalEvaluator(images, texts[:44], g)
    with pytest.raises(ValueError, match="ties must be one of"):
        RetrievalEvaluator(images, texts, g, ties="random")


def test_evaluator_scores_a_zero_model_as_chance():
    class Zero(TwoTowers):
        def encode(self, modality, x):
            return torch.zeros(len(x), 6)

    g = np.repeat(np.arange(10), 2)
    out = RetrievalEvaluator(torch.randn(10, 12), torch.randn(20, 9), g, ks=(1,))(Zero())
    assert out["t2i/R@1"] == pytest.approx(10.0) and out["i2t/R@1"] == pytest.approx(100 * 2 / 20)
    with pytest.raises(ValueError, match="image embeddings has zero-norm rows"):
        RetrievalEvaluator(torch.randn(10, 12), torch.randn(20, 9), g, degenerate="error")(Zero())


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------

def _ok():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 4)), rng.standard_normal((6, 4)), np.array([0, 1, 2, 0, 1, 2])


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
    (lambda I, T, g: (I, np.where(np.arange(6)[:, None] == 3, 0.0, T), g),
     r"text_emb has zero-norm rows .* first in row 3 \(1 of 6\)"),
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
    with pytest.raises(ValueError, match="ties must be one of 'expected', 'pessimistic', 'optimistic'"):
        retrieval_metrics(I, T, g, ties="random")
    with pytest.raises(ValueError, match="degenerate must be one of"):
        retrieval_metrics(I, T, g, degenerate="skip")
    with pytest.raises(ValueError, match="precision must be one of"):
        retrieval_metrics(I, T, g, precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_ranks_on_gpu_match_brute_force(tied_data, tied_truth, precision):
    I, T, g = tied_data
    for mode in MODES:
        check_against(tied_truth, torch.from_numpy(I).cuda(), torch.from_numpy(T).cuda(), g, mode,
                      normalize=False, chunk_size=7, precision=precision)
