"""The low-precision filter: its error bound holds, and ranks equal float64 scoring on near-ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.retrieval import precision as P
from experiments.retrieval import retrieval_metrics, retrieval_ranks

from test_retrieval import MODES, brute, check_against, exact_scores  # noqa: E402 (tests/experiments is on sys.path)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dim,normalize", [(7, True), (64, True), (300, True), (64, False)])
def test_bound_holds_for_every_pair(precision, dim, normalize):
    rng = np.random.default_rng(dim)
    scale = 1.0 if normalize else 3.0
    I = rng.standard_normal((50, dim)) * rng.uniform(0.01, scale, (50, 1))
    T = rng.standard_normal((80, dim)) ** 3  # heavy tails: large per-element rounding errors
    cpu = torch.device("cpu")
    If = P.FilterSide(I, "I", normalize, "error", precision, cpu)
    Tf = P.FilterSide(T, "T", normalize, "error", precision, cpu)
    S = torch.mm(Tf.tensor(slice(None)), If.tensor(slice(None)).T).double().numpy()
    exact = exact_scores(I, T, normalize)
    err = np.abs(S - exact)
    bf16_out = precision == "bf16"
    d_t = P.score_bounds(Tf, If, dim, bf16_out)  # per caption, against every image
    d_i = P.score_bounds(If, Tf, dim, bf16_out)  # per image, against every caption
    assert (err <= d_t[:, None]).all() and (err <= d_i[None, :]).all()
    if normalize:  # and it is not vacuous
        assert d_t.max() < (0.02 if precision == "bf16" else 1e-4)


def test_float32_band_rounds_outwards():
    t = np.array([0.1, -0.3, 1 / 3, np.inf])
    d = np.array([1e-12, 0.0, 1e-9, 1.0])
    lo, hi = P.float32_band(t, d)
    assert lo.dtype == np.float32 and hi.dtype == np.float32
    assert (lo[:3].astype(np.float64) <= t[:3] - d[:3]).all() and (hi[:3].astype(np.float64) >= t[:3] + d[:3]).all()
    assert lo[3] == np.inf and hi[3] == np.inf


@pytest.fixture(scope="module", params=[np.float64, np.float32])
def near_ties(request):
    """Clusters of images and captions whose float64 scores differ only in the last bits of a float32
    (or not at all): float32 scoring alone gets many ranks wrong."""
    rng = np.random.default_rng(7)
    dim, n_clusters, per_cluster = 24, 4, 5
    base = rng.standard_normal((n_clusters, dim))
    I = np.repeat(base, per_cluster, axis=0)
    I = I + 1e-7 * rng.standard_normal(I.shape) * (rng.random((len(I), 1)) < 0.7)  # some exact copies
    g = np.repeat(np.arange(len(I)), 3)
    T = I[g] + 1e-7 * rng.standard_normal((len(g), dim)) * (rng.random((len(g), 1)) < 0.8)
    T[::7] = T[1::7][: len(T[::7])]  # duplicated captions across images
    return I.astype(request.param), T.astype(request.param), rng.permutation(len(g)), g


@pytest.mark.parametrize("precision,torch_counting", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_adversarial_near_ties_equal_float64_rank_for_rank(near_ties, precision, torch_counting):
    I, T, perm, g = near_ties
    T, g = T[perm], g[perm]
    ref = brute(I, T, g)
    # the data is adversarial: plain float32 scoring ranks differently from float64
    S32 = (T.astype(np.float32) / np.linalg.norm(T.astype(np.float32), axis=1, keepdims=True)) @ (
        I.astype(np.float32) / np.linalg.norm(I.astype(np.float32), axis=1, keepdims=True)).T
    true32 = S32[np.arange(len(T)), g]
    naive = 1 + (S32 > true32[:, None]).sum(1)
    strict64 = np.array(ref["optimistic"]["t2i"]["rank"])
    assert (naive != strict64).any()
    for mode in MODES:
        r = check_against(ref, I, T, g, mode, chunk_size=8, precision=precision, _torch_counting=torch_counting)
        assert r.n_rescored > 0


def test_random_data_bf16_equals_fp32():
    rng = np.random.default_rng(8)
    g = rng.permutation(np.repeat(np.arange(150), 4))
    I = rng.standard_normal((150, 48)).astype(np.float32)
    T = (I[g] + 2.0 * rng.standard_normal((600, 48))).astype(np.float32)
    a = retrieval_ranks(I, T, g, precision="fp32", with_map=True)
    b = retrieval_ranks(I, T, g, precision="bf16", with_map=True, chunk_size=64)
    np.testing.assert_array_equal(a.image_to_text, b.image_to_text)
    np.testing.assert_array_equal(a.text_to_image, b.text_to_image)
    np.testing.assert_array_equal(a.image_to_text_ap, b.image_to_text_ap)
    assert b.n_rescored > a.n_rescored
    ref = brute(I[:30], T[g < 30], g[g < 30])  # and a slice against the reference
    check_against(ref, I[:30], T[g < 30], g[g < 30], "expected", precision="bf16")


def test_auto_precision_detects_the_hardware(monkeypatch):
    P.cpu_bf16_is_faster.cache_clear()
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx2", "fma"})
    assert P.choose_precision("auto", torch.device("cpu")) == "fp32"
    assert P.cpu_bf16_is_faster.cache_info().misses == 1
    P.choose_precision("auto", torch.device("cpu"))
    assert P.cpu_bf16_is_faster.cache_info().hits == 1  # detected once per process
    P.cpu_bf16_is_faster.cache_clear()
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    for t16, faster in ((0.5, True), (0.9, False)):  # measured, not assumed from the flags
        monkeypatch.setattr(P, "_best_time", lambda a, b: t16 if a.dtype == torch.bfloat16 else 1.0)
        P.cpu_bf16_is_faster.cache_clear()
        assert P.cpu_bf16_is_faster() is faster
        assert P.choose_precision("auto", torch.device("cpu")) == ("bf16" if faster else "fp32")
    P.cpu_bf16_is_faster.cache_clear()
    monkeypatch.undo()
    assert P._best_time(torch.ones(4, 3), torch.ones(5, 3), repeats=1) >= 0
    assert P.choose_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of 'auto', 'bf16', 'fp32'"):
        P.choose_precision("int8", torch.device("cpu"))


def test_caller_matmul_settings_are_restored():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        rng = np.random.default_rng(9)
        I = rng.standard_normal((10, 8))
        retrieval_metrics(I, I[np.repeat(np.arange(10), 2)], np.repeat(np.arange(10), 2))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(prev)
