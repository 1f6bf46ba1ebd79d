"""Closed-form canonical correlation analysis (CCA), registered as ``cca``.

``CCA`` solves the (ridge-regularised) CCA problem exactly in float64::

    max_{a, b}  a^T Cxy b   s.t.  a^T (Cxx + λx I) a = 1,  b^T (Cyy + λy I) b = 1

by whitening and one SVD: ``(Cxx+λx I)^{-1/2} Cxy (Cyy+λy I)^{-1/2} = A S B^T``, with
``x_weights_ = (Cxx+λx I)^{-1/2} A[:, :k]`` (and likewise for y). The whitening comes from
an eigendecomposition of the view's covariance, computed either

* in feature space (``solver="covariance"``: eigh of the p×p covariance, cost O(n p² + p³)), or
* in sample space (``solver="gram"``: eigh of the n×n Gram matrix of the centred data,
  cost O(n² p + n³)), which is the cheap and well-posed route when n < p.

``solver="auto"`` picks the covariance route when ``n >= max(p, q)``, else the Gram route.

Regularisation: ``λx = reg_x * trace(Cxx) / p`` with ``reg_mode="relative"`` (the default;
a fraction of the mean feature variance, so it is invariant to a global rescaling of the
data), or ``λx = reg_x`` with ``reg_mode="absolute"``. With ``λ = 0`` a singular covariance
(rank-deficient data, or ``n <= p``) raises ``np.linalg.LinAlgError`` naming the view and its
numerical rank; with ``λ > 0`` the problem is always well posed (directions outside the span
of the data get no weight, which is the optimum of the regularised objective). A constant view
raises ``ValueError`` whatever the ridge (there is nothing to correlate).

How far the ridge moves the solution from exact CCA (restricted to the span of the data): to first
order each whitened direction of eigenvalue ``w`` is shrunk by ``λ / (w + λ)``, so the variates and
weights move by about ``reg_effect_ = max(λx / min wx, λy / min wy)`` (relative; measured at most
2×) and the correlations, which are stationary at the optimum, by at most ``reg_effect_²``. With
the default ``reg=1e-6`` (relative) this is *not* "exact up to 1e-6": measured over 20 random seeds
(n=200, p=20, q=15), the variates were within 3e-5 of exact CCA on full-rank data, within 1.6e-4
on rank-deficient data (``X = X₁₂ @ R``), and anywhere up to 1.0 when a view's eigenvalues span
six decades (the weak directions are then dominated by the ridge); the correlations were within
1e-9 in the first two cases. Read ``reg_effect_`` after fitting to know which case you are in.

After fitting, the weights are rescaled so that each canonical variate has unit variance on
the training data, and ``correlations_`` are the empirical training correlations of the
variate pairs. With ``λ = 0`` the variates are exactly uncorrelated within a view
(``U^T U / (n-1) = I``) and ``correlations_`` are the canonical correlations; with ``λ > 0``
they are the (slightly lower) correlations of the regularised solution.

The random-Fourier-feature kernel CCA (``kernel_cca``) is :class:`align.kernel_cca.KernelCCA` (a linear CCA on
random features; ``align.cca.KernelCCA`` still names it); the pieces both share (input checks, a view's
eigenbasis, ``.npz`` I/O) are in :mod:`align.cca_math`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor

from align.base import ALIGNERS, InputSpec
from align.cca_math import (DEFAULT_MODALITIES, ArrayLike, RegMode, Solver, _as_float64_2d, _load_npz, _save_npz,
                            _view_basis)

log = logging.getLogger(__name__)

_LEARNED = ("x_mean_", "y_mean_", "x_weights_", "y_weights_", "correlations_", "reg_x_", "reg_y_",
            "x_rank_", "y_rank_", "n_features_in_", "n_features_y_", "n_samples_fit_")
_OPTIONAL_LEARNED = ("reg_effect_",)  # absent from states saved before it existed


@ALIGNERS.register("cca")
class CCA(InputSpec):
    """Closed-form CCA between two views, with scikit-learn's ``fit``/``transform`` shape.

    ``X`` [n, p] is the view of ``modalities[0]`` and ``Y`` [n, q] that of ``modalities[1]``.

    Args:
        n_components: number of canonical pairs ``k`` to keep (``k <= min(p, q, n-1)``).
        reg: ridge for both views (see module docstring); ``reg_x``/``reg_y`` override it per view.
            The default 1e-6 guards against round-off; it moves the solution from exact CCA by
            about ``reg_effect_`` (see the module docstring: ~1e-5 to 1e-4 on well-posed and
            rank-deficient data, much more on badly conditioned data). For high-dimensional features
            with few samples, 1e-3 to 1e-1 usually gives higher held-out correlations. ``0`` asks for
            exact CCA and raises on singular data, naming the view and its constant columns.
        reg_mode: ``"relative"`` (ridge = reg × mean feature variance) or ``"absolute"``.
        solver: ``"auto"``, ``"covariance"`` (feature space) or ``"gram"`` (sample space).
        modalities: names of the X and Y views, for ``encode(modality, x)`` and for error messages;
            ``None`` gives the aligner interface's ``("image", "text")`` for ``encode``, and errors
            then call the views plain "X" and "Y".
        encode_power: :meth:`encode` (the aligner interface, used for retrieval) scales variate j by
            ``correlations_[j] ** encode_power``, so weakly correlated, noisy pairs count less in the
            cosine — the eigenvalue weighting of Gong et al. (IJCV 2014), who use power 4. ``0``
            gives the plain variates; :meth:`transform` always returns the plain variates.

    Learned attributes: ``x_mean_`` [p], ``y_mean_`` [q], ``x_weights_`` [p, k], ``y_weights_``
    [q, k] (projection matrices: ``U = (X - x_mean_) @ x_weights_``), ``correlations_`` [k]
    (training correlations of the variate pairs, in the order of the regularised problem's
    singular values: descending when ``reg = 0``), ``reg_x_``/``reg_y_`` (absolute ridges used),
    ``x_rank_``/``y_rank_``, ``n_features_in_`` (p), ``n_features_y_`` (q), ``n_samples_fit_``,
    ``solver_``, ``reg_effect_`` (the ridge's relative effect on the solution, see above).
    """

    def __init__(
        self,
        n_components: int = 2,
        *,
        reg: float = 1e-6,
        reg_x: float | None = None,
        reg_y: float | None = None,
        reg_mode: RegMode = "relative",
        solver: Solver = "auto",
        modalities: Sequence[str] | None = None,
        encode_power: float = 4.0,
    ) -> None:
        self.n_components = n_components
        self.reg = reg
        self.reg_x = reg_x
        self.reg_y = reg_y
        self.reg_mode = reg_mode
        self.solver = solver
        self.named_views = modalities is not None  # error messages name the views only when the caller did
        self.modalities = tuple(modalities) if modalities is not None else DEFAULT_MODALITIES
        self.encode_power = encode_power

    def __repr__(self) -> str:
        return (f"CCA(n_components={self.n_components}, reg={self.reg}, reg_x={self.reg_x}, reg_y={self.reg_y}, "
                f"reg_mode={self.reg_mode!r}, solver={self.solver!r}, modalities={self.modalities}, "
                f"encode_power={self.encode_power})")

    # ------------------------------------------------------------------ fitting
    def _check_params(self) -> tuple[float, float]:
        if not isinstance(self.n_components, (int, np.integer)) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {self.n_components!r}")
        if self.reg_mode not in ("relative", "absolute"):
            raise ValueError(f"reg_mode must be 'relative' or 'absolute', got {self.reg_mode!r}")
        if self.solver not in ("auto", "covariance", "gram"):
            raise ValueError(f"solver must be 'auto', 'covariance' or 'gram', got {self.solver!r}")
        if len(self.modalities) != 2 or self.modalities[0] == self.modalities[1]:
            raise ValueError(f"modalities must be two distinct names, got {self.modalities!r}")
        rx = self.reg if self.reg_x is None else self.reg_x
        ry = self.reg if self.reg_y is None else self.reg_y
        for name, r in (("reg_x", rx), ("reg_y", ry)):
            if not np.isfinite(r) or r < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {r!r}")
        return float(rx), float(ry)

    def fit(self, X: ArrayLike, Y: ArrayLike) -> "CCA":
        """Fit on paired views ``X`` [n, p] and ``Y`` [n, q] (numpy or torch)."""
        rx, ry = self._check_params()
        X = _as_float64_2d("X", X)
        Y = _as_float64_2d("Y", Y)
        n, p = X.shape
        q = Y.shape[1]
        if Y.shape[0] != n:
            raise ValueError(f"X has {n} rows but Y has {Y.shape[0]}: CCA needs paired rows")
        if n < 2:
            raise ValueError(f"CCA needs at least 2 samples, got {n}")
        k = int(self.n_components)
        if k > min(p, q, n - 1):
            raise ValueError(
                f"n_components={k} must be <= min(n_features_x={p}, n_features_y={q}, n_samples-1={n - 1})"
            )
        solver = self.solver if self.solver != "auto" else ("covariance" if n >= max(p, q) else "gram")

        x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
        Xc, Yc = X - x_mean, Y - y_mean
        del X, Y
        view_x, view_y = self._view_names()
        wx, Bx, lx, rank_x = _view_basis(view_x, Xc, rx, self.reg_mode, solver, "reg_x")
        wy, By, ly, rank_y = _view_basis(view_y, Yc, ry, self.reg_mode, solver, "reg_y")
        if k > min(rank_x, rank_y):
            raise ValueError(
                f"n_components={k} exceeds the numerical rank of the data (X: {rank_x}, Y: {rank_y})"
            )
        isx, isy = 1.0 / np.sqrt(wx + lx), 1.0 / np.sqrt(wy + ly)  # (w + λ)^{-1/2}
        if solver == "covariance":
            # M = (Cxx+λ)^{-1/2} Cxy (Cyy+λ)^{-1/2}, in the eigenbases of Cxx and Cyy
            Cxy = Xc.T @ Yc / (n - 1)
            M = (isx[:, None] * (Bx.T @ Cxy @ By)) * isy[None, :]
        else:
            # Same matrix in sample space: B are the left singular vectors of the centred data.
            ex, ey = np.sqrt(wx) * isx, np.sqrt(wy) * isy
            M = (ex[:, None] * (Bx.T @ By)) * ey[None, :]
        A, s, Vt = np.linalg.svd(M, full_matrices=False)
        A, s, Bm = A[:, :k], s[:k], Vt[:k].T
        if solver == "covariance":
            Wx, Wy = Bx @ (isx[:, None] * A), By @ (isy[:, None] * Bm)
        else:
            # feature-space eigenvectors are Zc^T B / sqrt((n-1) w)
            Wx = Xc.T @ (Bx @ ((isx / np.sqrt((n - 1) * wx))[:, None] * A))
            Wy = Yc.T @ (By @ ((isy / np.sqrt((n - 1) * wy))[:, None] * Bm))
        # Training variances of the variates (exactly 1 when λ = 0) and their correlations.
        var_x = ((wx * isx**2)[:, None] * A**2).sum(axis=0)
        var_y = ((wy * isy**2)[:, None] * Bm**2).sum(axis=0)
        tiny = np.finfo(np.float64).tiny
        sx, sy = np.sqrt(np.maximum(var_x, tiny)), np.sqrt(np.maximum(var_y, tiny))
        Wx, Wy = Wx / sx, Wy / sy
        corr = np.clip(s / (sx * sy), 0.0, 1.0)
        # Deterministic signs: the largest-magnitude entry of each x weight vector is positive.
        signs = np.sign(Wx[np.argmax(np.abs(Wx), axis=0), np.arange(k)])
        signs[signs == 0] = 1.0
        Wx, Wy = Wx * signs, Wy * signs

        self.x_mean_, self.y_mean_ = x_mean, y_mean
        self.x_weights_, self.y_weights_ = Wx, Wy
        self.correlations_ = corr
        self.reg_x_, self.reg_y_ = lx, ly
        self.x_rank_, self.y_rank_ = rank_x, rank_y
        self.n_features_in_, self.n_features_y_, self.n_samples_fit_ = p, q, n
        self.solver_ = solver
        self.reg_effect_ = float(max(lx / wx.min(), ly / wy.min()))
        log.debug("CCA fit: n=%d p=%d q=%d k=%d solver=%s λx=%.3g λy=%.3g ρ1=%.4f ρk=%.4f reg_effect=%.2g",
                  n, p, q, k, solver, lx, ly, corr[0], corr[-1], self.reg_effect_)
        return self

    def _view_names(self) -> tuple[str, str]:
        """How errors name the two views: "X"/"Y", with the modality names when the caller gave them."""
        if not getattr(self, "named_views", True):
            return "X", "Y"
        return f"X ({self.modalities[0]!r})", f"Y ({self.modalities[1]!r})"

    # ---------------------------------------------------------------- transform
    def _check_fitted(self) -> None:
        if not hasattr(self, "x_weights_"):
            raise NotFittedError("this CCA instance is not fitted yet; call fit(X, Y) first")

    def transform_x(self, X: ArrayLike) -> np.ndarray:
        """Canonical variates of view X: ``(X - x_mean_) @ x_weights_`` [n, k] (float64 numpy)."""
        self._check_fitted()
        X = _as_float64_2d("X", X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features but CCA was fitted with {self.n_features_in_}")
        return (X - self.x_mean_) @ self.x_weights_

    def transform_y(self, Y: ArrayLike) -> np.ndarray:
        """Canonical variates of view Y: ``(Y - y_mean_) @ y_weights_`` [n, k] (float64 numpy)."""
        self._check_fitted()
        Y = _as_float64_2d("Y", Y)
        if Y.shape[1] != self.n_features_y_:
            raise ValueError(f"Y has {Y.shape[1]} features but CCA was fitted with {self.n_features_y_}")
        return (Y - self.y_mean_) @ self.y_weights_

    def transform(self, X: ArrayLike, Y: ArrayLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``U`` [n, k] for ``X`` alone, or ``(U, V)`` for both views (as scikit-learn's CCA)."""
        if Y is None:
            return self.transform_x(X)
        return self.transform_x(X), self.transform_y(Y)

    def fit_transform(self, X: ArrayLike, Y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        return self.fit(X, Y).transform(X, Y)

    def score(self, X: ArrayLike, Y: ArrayLike) -> np.ndarray:
        """Per-component Pearson correlations [k] of the variate pairs on (held-out) data."""
        U, V = self.transform(X, Y)
        U, V = U - U.mean(0), V - V.mean(0)
        den = np.linalg.norm(U, axis=0) * np.linalg.norm(V, axis=0)
        return (U * V).sum(0) / np.maximum(den, np.finfo(np.float64).tiny)

    # ------------------------------------------------------- aligner interface
    def encode(self, modality: str, x: ArrayLike) -> Tensor:
        """Canonical variates [N, k] of ``modality``'s features ``x`` [N, d], each scaled by
        ``correlations_ ** encode_power``, as a float32 tensor.

        Computed in torch on ``x``'s device (float64 where the device supports it).
        """
        self._check_fitted()
        if modality not in self.modalities:
            raise ValueError(f"CCA encodes {self.modalities}, not {modality!r}")
        is_x = modality == self.modalities[0]
        mean, W = (self.x_mean_, self.x_weights_) if is_x else (self.y_mean_, self.y_weights_)
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != W.shape[0]:
            raise ValueError(f"CCA.encode({modality!r}): expected [N, {W.shape[0]}] features, got {tuple(x.shape)}")
        dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        mean_t = torch.as_tensor(mean, dtype=dtype, device=x.device)
        W_t = torch.as_tensor(W, dtype=dtype, device=x.device)
        scale = torch.as_tensor(np.clip(self.correlations_, 0.0, None) ** self.encode_power, dtype=dtype,
                                device=x.device)
        return ((x.to(dtype) - mean_t) @ W_t * scale).float()

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and learned arrays as a flat dict of numpy arrays (no pickle needed)."""
        state: dict[str, np.ndarray] = {
            "n_components": np.asarray(self.n_components),
            "reg": np.asarray(self.reg, dtype=np.float64),
            "reg_x": np.asarray(np.nan if self.reg_x is None else self.reg_x, dtype=np.float64),
            "reg_y": np.asarray(np.nan if self.reg_y is None else self.reg_y, dtype=np.float64),
            "reg_mode": np.asarray(self.reg_mode),
            "solver": np.asarray(self.solver),
            "modalities": np.asarray(self.modalities),
            "named_views": np.asarray(self.named_views),
            "encode_power": np.asarray(self.encode_power, dtype=np.float64),
        }
        if hasattr(self, "x_weights_"):
            state.update({name: np.asarray(getattr(self, name)) for name in _LEARNED + _OPTIONAL_LEARNED})
            state["solver_"] = np.asarray(self.solver_)
        return state

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "CCA":
        """Rebuild a (fitted) CCA from :meth:`state_dict`'s output."""
        missing = {"n_components", "reg", "reg_x", "reg_y", "reg_mode", "solver", "modalities"} - set(state)
        if missing:
            raise KeyError(f"CCA state is missing {sorted(missing)}")

        def opt(v: np.ndarray) -> float | None:
            return None if np.isnan(v) else float(v)

        named = bool(state["named_views"]) if "named_views" in state else True
        obj = cls(int(state["n_components"]), reg=float(state["reg"]), reg_x=opt(state["reg_x"]),
                  reg_y=opt(state["reg_y"]), reg_mode=str(state["reg_mode"]), solver=str(state["solver"]),
                  modalities=[str(m) for m in state["modalities"]] if named else None,
                  encode_power=float(state.get("encode_power", 0.0)))
        if "x_weights_" in state:
            for name in _LEARNED + tuple(n for n in _OPTIONAL_LEARNED if n in state):
                v = np.asarray(state[name])
                setattr(obj, name, v if v.ndim else v.item())
            obj.solver_ = str(state["solver_"])
        return obj

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to an ``.npz`` file atomically (temp file + ``os.replace``)."""
        return _save_npz(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CCA":
        """Load a CCA written by :meth:`save` (``allow_pickle=False``)."""
        return cls.from_state(_load_npz(path))


def __getattr__(name: str) -> Any:
    """``align.cca.KernelCCA``: the kernel CCA lives in :mod:`align.kernel_cca` (imported on first use, since it
    builds on this module's :class:`CCA`)."""
    if name == "KernelCCA":
        from align.kernel_cca import KernelCCA

        return KernelCCA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
