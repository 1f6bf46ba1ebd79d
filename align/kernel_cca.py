"""Approximate RBF-kernel CCA (registered as ``kernel_cca``): random Fourier features per view, then the linear,
closed-form :class:`align.cca.CCA` on them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor

from align.base import ALIGNERS, InputSpec
from align.cca import CCA
from align.cca_math import DEFAULT_MODALITIES, ArrayLike, RegMode, Solver, _as_float64_2d, _load_npz, _save_npz


@ALIGNERS.register("kernel_cca")
class KernelCCA(InputSpec):
    """Approximate RBF-kernel CCA: random Fourier features per view, then linear :class:`CCA`.

    Each view ``x`` [n, d] is mapped to ``sqrt(2/m) cos(x W + b)`` [n, m] (``m = n_features``),
    with ``W ~ N(0, 2γ)`` and ``b ~ U(0, 2π)`` drawn by scikit-learn's ``RBFSampler``; this
    approximates the kernel ``exp(-γ ||x - x'||²)``. ``gamma="scale"`` uses ``1 / (d · Var(x))``.
    Kernel CCA overfits without regularisation, so ``reg`` defaults to 1e-3 (relative, see
    :class:`CCA`); ``encode_power`` as in :class:`CCA`.

    Learned attributes: ``cca_`` (the linear CCA on the features), ``x_random_weights_`` [p, m],
    ``x_random_offset_`` [m] (and ``y_`` likewise), ``correlations_`` [k], ``n_features_in_``.
    """

    def __init__(
        self,
        n_components: int = 2,
        *,
        n_features: int = 1024,
        gamma: float | Literal["scale"] = "scale",
        gamma_y: float | Literal["scale"] | None = None,
        reg: float = 1e-3,
        reg_mode: RegMode = "relative",
        solver: Solver = "auto",
        seed: int = 0,
        modalities: Sequence[str] | None = None,
        encode_power: float = 4.0,
    ) -> None:
        self.encode_power = encode_power
        self.n_components = n_components
        self.n_features = n_features
        self.gamma = gamma
        self.gamma_y = gamma_y
        self.reg = reg
        self.reg_mode = reg_mode
        self.solver = solver
        self.seed = seed
        self.named_views = modalities is not None
        self.modalities = tuple(modalities) if modalities is not None else DEFAULT_MODALITIES

    def __repr__(self) -> str:
        return (f"KernelCCA(n_components={self.n_components}, n_features={self.n_features}, gamma={self.gamma!r}, "
                f"gamma_y={self.gamma_y!r}, reg={self.reg}, reg_mode={self.reg_mode!r}, solver={self.solver!r}, "
                f"seed={self.seed}, modalities={self.modalities})")

    def _check_params(self) -> None:
        """A bad option raises ``ValueError`` naming it. Called by :meth:`fit` (the constructor only stores, as in
        scikit-learn) and by ``alignfuse run --dry-run`` (:func:`experiments.part_options.check_build`)."""
        for name in ("n_components", "n_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, choices in (("gamma", "'scale'"), ("gamma_y", "None, 'scale'")):
            value = getattr(self, name)
            if value == "scale" or (value is None and name == "gamma_y"):
                continue
            if (isinstance(value, (str, bool)) or not isinstance(value, (int, float, np.number))
                    or not np.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be {choices} or a positive number, got {value!r}")
        if isinstance(self.reg, (str, bool)) or not np.isfinite(self.reg) or self.reg < 0:
            raise ValueError(f"reg must be a finite number >= 0, got {self.reg!r}")
        if self.reg_mode not in ("relative", "absolute"):
            raise ValueError(f"reg_mode must be 'relative' or 'absolute', got {self.reg_mode!r}")
        if self.solver not in ("auto", "covariance", "gram"):
            raise ValueError(f"solver must be 'auto', 'covariance' or 'gram', got {self.solver!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if len(self.modalities) != 2 or self.modalities[0] == self.modalities[1]:
            raise ValueError(f"modalities must be two distinct names, got {self.modalities!r}")

    def fit(self, X: ArrayLike, Y: ArrayLike) -> "KernelCCA":
        """Draw the random features and fit the linear CCA on them; ``X`` [n, p], ``Y`` [n, q]."""
        from sklearn.kernel_approximation import RBFSampler

        self._check_params()
        X = _as_float64_2d("X", X)
        Y = _as_float64_2d("Y", Y)
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}: CCA needs paired rows")
        gy = self.gamma if self.gamma_y is None else self.gamma_y
        rx = RBFSampler(gamma=self.gamma, n_components=self.n_features, random_state=self.seed).fit(X)
        ry = RBFSampler(gamma=gy, n_components=self.n_features, random_state=self.seed + 1).fit(Y)
        self.x_random_weights_, self.x_random_offset_ = rx.random_weights_, rx.random_offset_
        self.y_random_weights_, self.y_random_offset_ = ry.random_weights_, ry.random_offset_
        self.n_features_in_, self.n_features_y_ = X.shape[1], Y.shape[1]
        self.cca_ = CCA(self.n_components, reg=self.reg, reg_mode=self.reg_mode, solver=self.solver,
                        modalities=self.modalities if self.named_views else None, encode_power=self.encode_power)
        self.cca_.fit(self._features(0, X), self._features(1, Y))
        self.correlations_ = self.cca_.correlations_
        return self

    def _features(self, view: int, Z: ArrayLike) -> np.ndarray:
        if not hasattr(self, "x_random_weights_"):
            raise NotFittedError("this KernelCCA instance is not fitted yet; call fit(X, Y) first")
        name = "XY"[view]
        W, b = ((self.x_random_weights_, self.x_random_offset_) if view == 0
                else (self.y_random_weights_, self.y_random_offset_))
        Z = _as_float64_2d(name, Z)
        if Z.shape[1] != W.shape[0]:
            raise ValueError(f"{name} has {Z.shape[1]} features but KernelCCA was fitted with {W.shape[0]}")
        return np.sqrt(2.0 / W.shape[1]) * np.cos(Z @ W + b)

    def transform_x(self, X: ArrayLike) -> np.ndarray:
        """Kernel canonical variates [n, k] of view X."""
        return self.cca_.transform_x(self._features(0, X))

    def transform_y(self, Y: ArrayLike) -> np.ndarray:
        """Kernel canonical variates [n, k] of view Y."""
        return self.cca_.transform_y(self._features(1, Y))

    def transform(self, X: ArrayLike, Y: ArrayLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``U`` for ``X`` alone, or ``(U, V)`` for both views."""
        if Y is None:
            return self.transform_x(X)
        return self.transform_x(X), self.transform_y(Y)

    def score(self, X: ArrayLike, Y: ArrayLike) -> np.ndarray:
        """Per-component correlations [k] of the variate pairs on (held-out) data."""
        return self.cca_.score(self._features(0, X), self._features(1, Y))

    def encode(self, modality: str, x: ArrayLike) -> Tensor:
        """Kernel canonical variates [N, k] of ``x`` [N, d] as float32, computed on ``x``'s device."""
        if not hasattr(self, "cca_"):
            raise NotFittedError("this KernelCCA instance is not fitted yet; call fit(X, Y) first")
        if modality not in self.modalities:
            raise ValueError(f"KernelCCA encodes {self.modalities}, not {modality!r}")
        W, b = ((self.x_random_weights_, self.x_random_offset_) if modality == self.modalities[0]
                else (self.y_random_weights_, self.y_random_offset_))
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != W.shape[0]:
            raise ValueError(f"KernelCCA.encode({modality!r}): expected [N, {W.shape[0]}] features, "
                             f"got {tuple(x.shape)}")
        dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        W_t = torch.as_tensor(W, dtype=dtype, device=x.device)
        b_t = torch.as_tensor(b, dtype=dtype, device=x.device)
        feats = (2.0 / W.shape[1]) ** 0.5 * torch.cos(x.to(dtype) @ W_t + b_t)
        return self.cca_.encode(modality, feats)

    _ARRAYS = ("x_random_weights_", "x_random_offset_", "y_random_weights_", "y_random_offset_")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters, random features and the inner CCA's state (keys ``cca.*``) as numpy arrays."""
        def g(v: Any) -> np.ndarray:  # gamma: "scale", a float, or None (stored as "")
            return np.asarray("" if v is None else v if isinstance(v, str) else float(v))

        state = {"n_components": np.asarray(self.n_components), "n_features": np.asarray(self.n_features),
                 "gamma": g(self.gamma), "gamma_y": g(self.gamma_y), "reg": np.asarray(float(self.reg)),
                 "reg_mode": np.asarray(self.reg_mode), "solver": np.asarray(self.solver),
                 "seed": np.asarray(self.seed), "modalities": np.asarray(self.modalities),
                 "named_views": np.asarray(self.named_views),
                 "encode_power": np.asarray(float(self.encode_power))}
        if hasattr(self, "cca_"):
            state.update({name: getattr(self, name) for name in self._ARRAYS})
            state.update({f"cca.{k}": v for k, v in self.cca_.state_dict().items()})
        return state

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "KernelCCA":
        """Rebuild a (fitted) KernelCCA from :meth:`state_dict`'s output."""
        def g(v: np.ndarray) -> float | str | None:
            return (None if str(v) == "" else str(v)) if v.dtype.kind == "U" else float(v)

        named = bool(state["named_views"]) if "named_views" in state else True
        obj = cls(int(state["n_components"]), n_features=int(state["n_features"]), gamma=g(state["gamma"]),
                  gamma_y=g(state["gamma_y"]), reg=float(state["reg"]), reg_mode=str(state["reg_mode"]),
                  solver=str(state["solver"]), seed=int(state["seed"]),
                  modalities=[str(m) for m in state["modalities"]] if named else None,
                  encode_power=float(state.get("encode_power", 0.0)))
        if "cca.x_weights_" in state:
            for name in cls._ARRAYS:
                setattr(obj, name, np.asarray(state[name]))
            obj.cca_ = CCA.from_state({k[4:]: v for k, v in state.items() if k.startswith("cca.")})
            obj.correlations_ = obj.cca_.correlations_
            obj.n_features_in_ = obj.x_random_weights_.shape[0]
            obj.n_features_y_ = obj.y_random_weights_.shape[0]
        return obj

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to an ``.npz`` file atomically."""
        return _save_npz(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KernelCCA":
        """Load a KernelCCA written by :meth:`save` (``allow_pickle=False``)."""
        return cls.from_state(_load_npz(path))
