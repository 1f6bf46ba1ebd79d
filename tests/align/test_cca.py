"""Tests of align.cca: exact CCA against a textbook reference, sklearn, regularisation, I/O, interface."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align import CCA, KernelCCA, build_aligner, is_closed_form
from align.base import encode_in_batches


pytestmark = pytest.mark.usefixtures("one_thread")


def two_views(n: int, p: int, q: int, k: int = 3, noise: float = 1.0, seed: int = 0):
    """Views sharing a k-dim latent, plus isotropic noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    X = z @ rng.normal(size=(k, p)) + noise * rng.normal(size=(n, p)) + 3.0
    Y = z @ rng.normal(size=(k, q)) + noise * rng.normal(size=(n, q)) - 1.0
    return X, Y


def reference_cca(X: np.ndarray, Y: np.ndarray, k: int, lam_x: float = 0.0, lam_y: float = 0.0):
    """Textbook CCA via Cholesky whitening: SVD of Lx^{-1} Cxy Ly^{-T}; a = Lx^{-T} u.

    Weights are rescaled to unit training variance and sign-fixed like the library's; returns
    (weights_x, weights_y, empirical correlations).
    """
    n = len(X)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Cxx = Xc.T @ Xc / (n - 1) + lam_x * np.eye(X.shape[1])
    Cyy = Yc.T @ Yc / (n - 1) + lam_y * np.eye(Y.shape[1])
    Cxy = Xc.T @ Yc / (n - 1)
    Lx, Ly = np.linalg.cholesky(Cxx), np.linalg.cholesky(Cyy)
    T = np.linalg.solve(Lx, np.linalg.solve(Ly, Cxy.T).T)  # Lx^{-1} Cxy Ly^{-T}
    u, _, vt = np.linalg.svd(T)
    a = np.linalg.solve(Lx.T, u[:, :k])
    b = np.linalg.solve(Ly.T, vt[:k].T)
    U, V = Xc @ a, Yc @ b
    a, b = a / U.std(0, ddof=1), b / V.std(0, ddof=1)
    U, V = Xc @ a, Yc @ b
    s = np.sign(a[np.abs(a).argmax(0), np.arange(k)])
    corr = np.array([np.corrcoef(U[:, i], V[:, i])[0, 1] for i in range(k)])
    return a * s, b * s, corr


def empirical_corr(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(U[:, i], V[:, i])[0, 1] for i in range(U.shape[1])])


@pytest.mark.parametrize("solver", ["covariance", "gram"])
def test_matches_textbook_reference(solver):
    X, Y = two_views(400, 12, 9, k=4, seed=1)
    model = CCA(4, reg=0.0, solver=solver).fit(X, Y)
    a, b, corr = reference_cca(X, Y, 4)
    np.testing.assert_allclose(model.correlations_, corr, atol=1e-10)
    np.testing.assert_allclose(model.x_weights_, a, atol=1e-8)
    np.testing.assert_allclose(model.y_weights_, b, atol=1e-8)
    assert model.solver_ == solver
    assert np.all(np.diff(model.correlations_) <= 1e-12)  # descending


def test_correlations_are_empirical_and_variates_uncorrelated_within_view():
    X, Y = two_views(500, 10, 8, k=3, seed=2)
    model = CCA(6, reg=0.0).fit(X, Y)
    U, V = model.transform(X, Y)
    n = len(X)
    np.testing.assert_allclose(model.correlations_, empirical_corr(U, V), atol=1e-10)
    np.testing.assert_allclose(U.T @ U / (n - 1), np.eye(6), atol=1e-10)
    np.testing.assert_allclose(V.T @ V / (n - 1), np.eye(6), atol=1e-10)
    # cross-covariance is diagonal: variate i of X correlates only with variate i of Y
    np.testing.assert_allclose(U.T @ V / (n - 1), np.diag(model.correlations_), atol=1e-10)
    np.testing.assert_allclose(U.mean(0), 0, atol=1e-10)


def test_regularised_d_greater_than_n_both_solvers_agree_with_reference():
    X, Y = two_views(50, 200, 150, k=3, seed=3)
    models = {s: CCA(5, reg=0.1, solver=s).fit(X, Y) for s in ("gram", "covariance")}
    assert CCA(5, reg=0.1).fit(X, Y).solver_ == "gram"  # auto picks the sample-space route for n < d
    m = models["gram"]
    lam_x = 0.1 * np.trace(np.cov(X, rowvar=False)) / 200
    lam_y = 0.1 * np.trace(np.cov(Y, rowvar=False)) / 150
    assert m.reg_x_ == pytest.approx(lam_x) and m.reg_y_ == pytest.approx(lam_y)
    a, b, corr = reference_cca(X, Y, 5, lam_x, lam_y)
    for model in models.values():
        assert np.isfinite(model.x_weights_).all() and np.isfinite(model.y_weights_).all()
        np.testing.assert_allclose(model.correlations_, corr, atol=1e-8)
        np.testing.assert_allclose(model.x_weights_, a, atol=1e-6)
        np.testing.assert_allclose(model.y_weights_, b, atol=1e-6)
        U, V = model.transform(X, Y)
        np.testing.assert_allclose(model.correlations_, empirical_corr(U, V), atol=1e-10)
        np.testing.assert_allclose(U.var(0, ddof=1), 1.0, atol=1e-10)  # unit variance even with reg
    assert np.all(m.correlations_ < 1.0)


def test_absolute_reg_and_per_view_override():
    X, Y = two_views(300, 6, 5, seed=4)
    m = CCA(2, reg=0.5, reg_y=0.0, reg_mode="absolute").fit(X, Y)
    assert (m.reg_x_, m.reg_y_) == (0.5, 0.0)
    a, b, corr = reference_cca(X, Y, 2, 0.5, 0.0)
    np.testing.assert_allclose(m.x_weights_, a, atol=1e-8)
    np.testing.assert_allclose(m.correlations_, corr, atol=1e-10)


def test_singular_without_reg_raises_naming_the_view_and_rank():
    X, Y = two_views(100, 6, 5, seed=5)
    X[:, 5] = X[:, 0] - 2 * X[:, 1]  # rank-deficient X
    with pytest.raises(np.linalg.LinAlgError, match=r"view X\b.*rank 5 < 6.*set reg_x > 0"):
        CCA(2, reg=0.0).fit(X, Y)
    with pytest.raises(np.linalg.LinAlgError, match=r"view Y\b.*n_samples=20 <= n_features=30.*set reg_y > 0"):
        CCA(2, reg_x=1e-3, reg_y=0.0).fit(X[:20, :4], np.random.default_rng(0).normal(size=(20, 30)))
    model = CCA(2, reg=1e-3).fit(X, Y)  # regularised: fine
    assert np.isfinite(model.correlations_).all() and model.x_rank_ == 5


@pytest.mark.parametrize(
    "X, Y, match",
    [
        (np.zeros((10, 3, 1)), np.zeros((10, 3)), r"X must be 2-D"),
        (np.ones((10, 3)), np.ones((9, 3)), r"X has 10 rows but Y has 9"),
        (np.full((10, 3), np.nan), np.ones((10, 3)), r"X contains NaN or inf in 10"),
        (np.ones((10, 3)), np.array(["a"] * 30).reshape(10, 3), r"Y must be numeric"),
        (np.random.default_rng(0).normal(size=(10, 3)), np.random.default_rng(1).normal(size=(10, 2)),
         r"n_components=3 must be <= min\(n_features_x=3, n_features_y=2"),
    ],
)
def test_bad_inputs_raise(X, Y, match):
    with pytest.raises(ValueError, match=match):
        CCA(3).fit(X, Y)


def test_bad_params_and_unfitted():
    X, Y = two_views(50, 4, 4)
    with pytest.raises(ValueError, match="reg_x must be"):
        CCA(2, reg_x=-1.0).fit(X, Y)
    with pytest.raises(ValueError, match="solver must be"):
        CCA(2, solver="nipals").fit(X, Y)
    with pytest.raises(ValueError, match="not fitted"):
        CCA(2).transform(X)
    model = CCA(2).fit(X, Y)
    with pytest.raises(ValueError, match="X has 5 features but CCA was fitted with 4"):
        model.transform(np.ones((3, 5)))


def test_transform_on_new_data_and_torch_inputs():
    X, Y = two_views(600, 8, 7, k=2, noise=0.5, seed=6)
    model = CCA(2, reg=0.0).fit(X[:400], Y[:400])
    U, V = model.transform(X[400:], Y[400:])
    np.testing.assert_allclose(U, (X[400:] - X[:400].mean(0)) @ model.x_weights_, atol=1e-12)
    np.testing.assert_allclose(model.transform(X[400:]), U)
    np.testing.assert_allclose(model.score(X[400:], Y[400:]), empirical_corr(U, V), atol=1e-12)
    assert np.all(model.score(X[400:], Y[400:]) > 0.8)  # generalises on an easy problem
    torch_model = CCA(2, reg=0.0).fit(torch.from_numpy(X[:400]).float(), torch.from_numpy(Y[:400]))
    np.testing.assert_allclose(torch_model.correlations_, model.correlations_, atol=1e-5)


def test_agrees_with_sklearn_cca():
    from sklearn.cross_decomposition import CCA as SkCCA

    X, Y = two_views(1000, 6, 5, k=3, noise=1.0, seed=7)
    ours = CCA(3, reg=0.0).fit(X, Y)
    sk = SkCCA(3, max_iter=5000, tol=1e-12).fit(X, Y)
    U_sk, V_sk = sk.transform(X, Y)
    np.testing.assert_allclose(ours.correlations_, empirical_corr(U_sk, V_sk), atol=1e-3)
    U, V = ours.transform(X, Y)
    # same variates up to sign and scale
    for i in range(3):
        assert abs(np.corrcoef(U[:, i], U_sk[:, i])[0, 1]) > 1 - 1e-3
        assert abs(np.corrcoef(V[:, i], V_sk[:, i])[0, 1]) > 1 - 1e-3


def test_save_load_round_trip(tmp_path):
    X, Y = two_views(200, 7, 6, seed=8)
    model = CCA(3, reg=1e-2, reg_y=0.5, reg_mode="absolute", modalities=("image", "depth")).fit(X, Y)
    path = model.save(tmp_path / "cca.npz")
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    loaded = CCA.load(path)
    assert repr(loaded) == repr(model)
    for name in ("x_mean_", "y_mean_", "x_weights_", "y_weights_", "correlations_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert (loaded.n_features_in_, loaded.n_features_y_, loaded.solver_) == (7, 6, model.solver_)
    np.testing.assert_array_equal(loaded.transform(X, Y)[1], model.transform(X, Y)[1])
    assert CCA.from_state(CCA(2).state_dict()).n_components == 2  # unfitted state too


def test_encode_aligner_interface_and_registry():
    X, Y = two_views(300, 8, 6, seed=9)
    model = build_aligner("cca", n_components=3, modalities=("image", "text"))
    assert isinstance(model, CCA) and is_closed_form(model)
    model.fit(torch.from_numpy(X).float(), torch.from_numpy(Y).float())
    z_img = model.encode("image", torch.from_numpy(X).float())
    z_txt = encode_in_batches(model, "text", torch.from_numpy(Y).float(), batch_size=64)
    assert z_img.dtype == torch.float32 and z_img.shape == (300, 3) and z_txt.shape == (300, 3)
    U, V = model.transform(X, Y)
    weight = model.correlations_ ** 4  # default encode_power: Gong et al.'s eigenvalue weighting
    np.testing.assert_allclose(z_img.numpy(), U * weight, atol=1e-4)
    np.testing.assert_allclose(z_txt.numpy(), V * weight, atol=1e-4)
    plain = CCA(3, encode_power=0).fit(X, Y)
    np.testing.assert_allclose(plain.encode("image", torch.from_numpy(X)).numpy(), U, atol=1e-4)
    assert CCA.from_state(model.state_dict()).encode_power == 4.0
    with pytest.raises(ValueError, match="not 'depth'"):
        model.encode("depth", torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"expected \[N, 6\]"):
        model.encode("text", torch.zeros(2, 8))
    with pytest.raises(KeyError, match="known aligners: .*cca"):
        build_aligner("no_such_cca")
    built = CCA.from_inputs({"image": 8, "text": 6}, n_components=3)  # how the experiment runner builds it
    assert isinstance(built, CCA) and built.n_components == 3 and CCA.inputs == {"image": "vector", "text": "vector"}


def test_kernel_cca_finds_nonlinear_dependence():
    rng = np.random.default_rng(10)
    s = rng.uniform(-2, 2, size=(1500, 1))
    X = np.hstack([s, rng.normal(size=(1500, 1))])
    Y = np.hstack([s**2 + 0.1 * rng.normal(size=(1500, 1)), rng.normal(size=(1500, 1))])
    tr, te = slice(0, 1000), slice(1000, None)
    linear = CCA(1).fit(X[tr], Y[tr]).score(X[te], Y[te])
    kernel = build_aligner("kernel_cca", n_components=1, n_features=200, reg=1e-2, seed=0)
    kernel.fit(X[tr], Y[tr])
    assert abs(linear[0]) < 0.2 and kernel.score(X[te], Y[te])[0] > 0.8
    z = kernel.encode("image", torch.from_numpy(X[te]))
    np.testing.assert_allclose(z.numpy(), kernel.transform(X[te]) * kernel.correlations_ ** 4, atol=1e-4)


def test_kernel_cca_save_load(tmp_path):
    X, Y = two_views(200, 5, 4, seed=11)
    model = KernelCCA(2, n_features=64, gamma=0.1, reg=1e-2).fit(X, Y)
    loaded = KernelCCA.load(model.save(tmp_path / "kcca.npz"))
    assert repr(loaded) == repr(model)
    np.testing.assert_array_equal(loaded.transform(X, Y)[0], model.transform(X, Y)[0])


def test_view_names_come_from_the_caller_never_a_default_image():
    """Errors name the views "X"/"Y", plus the modality names only when the caller gave them."""
    X, Y = two_views(100, 6, 5, seed=5)
    X[:, 5] = X[:, 0] - 2 * X[:, 1]
    with pytest.raises(np.linalg.LinAlgError) as err:
        CCA(2, reg=0.0).fit(X, Y)
    assert "image" not in str(err.value) and "text" not in str(err.value)
    with pytest.raises(np.linalg.LinAlgError, match=r"view X \('left'\)"):
        CCA(2, reg=0.0, modalities=("left", "right")).fit(X, Y)
    with pytest.raises(np.linalg.LinAlgError, match=r"view Y \('right'\)"):
        CCA(2, reg=0.0, modalities=("left", "right")).fit(Y, X)
    model = CCA(2)
    assert model.modalities == ("image", "text")  # the aligner interface's default names still encode
    loaded = CCA.from_state(CCA(2, reg=0.0).state_dict())
    with pytest.raises(np.linalg.LinAlgError) as err:
        loaded.fit(X, Y)
    assert "image" not in str(err.value)


@pytest.mark.parametrize("reg, reg_mode", [(1e-6, "relative"), (0.5, "relative"), (0.5, "absolute"), (0.0, "relative")])
def test_constant_view_says_which_view_is_constant_not_to_raise_reg(reg, reg_mode):
    X, Y = two_views(50, 4, 3, seed=2)
    const = np.full((50, 3), 7.0)
    with pytest.raises(ValueError, match=r"view Y \('depth'\) is constant.*all 3 columns.*all 50 rows") as err:
        CCA(2, reg=reg, reg_mode=reg_mode, modalities=("image", "depth")).fit(X, const)
    assert "reg" not in str(err.value)  # regularisation cannot help: the message must not suggest it


def test_singular_error_lists_the_constant_columns():
    X, Y = two_views(60, 6, 4, seed=3)
    X[:, [1, 4]] = 2.5
    with pytest.raises(np.linalg.LinAlgError, match=r"columns \[1, 4\] are constant"):
        CCA(2, reg=0.0).fit(X, Y)
    model = CCA(2, reg=1e-3).fit(X, Y)  # the ridge handles constant columns (they get no weight)
    np.testing.assert_allclose(model.x_weights_[[1, 4]], 0.0, atol=1e-12)


def _exact_span_cca(X: np.ndarray, Y: np.ndarray, k: int):
    """Exact CCA restricted to each view's numerical column span (no ridge): correlations, variates U."""
    def basis(Z):
        U, s, _ = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
        return U[:, s > s[0] * max(Z.shape) * np.finfo(float).eps]

    Qx, Qy = basis(X), basis(Y)
    A, s, _ = np.linalg.svd(Qx.T @ Qy)
    return s[:k], Qx @ A[:, :k] * np.sqrt(len(X) - 1)


@pytest.mark.parametrize("case", ["full rank", "rank-deficient", "ill-conditioned"])
def test_default_ridge_distance_from_exact_cca_is_what_reg_effect_says(case):
    """The docstring's claim for the default reg=1e-6: variates within ~2 reg_effect_ (relative) of exact CCA,
    correlations within reg_effect_**2. On rank-deficient data the variates move by ~1e-4, not ~1e-6."""
    rng = np.random.default_rng(0)
    X, Y = two_views(200, 20, 15, k=5, seed=7)
    if case == "rank-deficient":
        X, Y = X[:, :12] @ rng.normal(size=(12, 20)), Y[:, :10] @ rng.normal(size=(10, 15))
    if case == "ill-conditioned":
        X = X * np.logspace(0, -2, 20)
    model = CCA(5).fit(X, Y)
    corr, U_exact = _exact_span_cca(X, Y, 5)
    U = model.transform(X)
    U = U * np.sign((U * U_exact).sum(0))
    rel = np.linalg.norm(U - U_exact, axis=0) / np.linalg.norm(U_exact, axis=0)
    assert 0 < model.reg_effect_ < 1
    assert rel.max() <= 2 * model.reg_effect_
    assert np.abs(model.correlations_ - corr).max() <= model.reg_effect_**2
    if case == "rank-deficient":
        assert rel.max() > 1e-5  # i.e. not "exact up to ~1e-6"
    assert CCA.from_state(model.state_dict()).reg_effect_ == model.reg_effect_


def test_save_interrupted_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    X, Y = two_views(100, 5, 4, seed=1)
    path = CCA(2).fit(X, Y).save(tmp_path / "cca.npz")
    before = path.read_bytes()

    def killed(f, **state):
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        CCA(3).fit(X, Y).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cca.npz"]
