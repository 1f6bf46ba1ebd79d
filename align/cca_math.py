"""Closed-form pieces shared by :class:`align.cca.CCA` and :class:`align.kernel_cca.KernelCCA`: input checks,
one view's regularised eigenbasis (the whitening step of CCA, see :mod:`align.cca`) and ``.npz`` state I/O."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor

from align.weights import write_file_atomically

ArrayLike = np.ndarray | Tensor
Solver = Literal["auto", "covariance", "gram"]
RegMode = Literal["relative", "absolute"]

DEFAULT_MODALITIES = ("image", "text")


def _as_float64_2d(name: str, a: Any) -> np.ndarray:
    """``a`` (numpy, torch or array-like) as a C-contiguous float64 [n, d] array; clear errors."""
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {tuple(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} of its {a.shape[0]} rows")
    return a


def _view_basis(
    view: str, Zc: np.ndarray, reg: float, reg_mode: RegMode, solver: str, reg_name: str = "reg"
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Eigen-decompose one centred view ``Zc`` [n, p].

    Returns ``(w, basis, lam, rank)``: the kept (numerically non-zero) eigenvalues ``w`` of the
    covariance ``Zc^T Zc / (n-1)``; their eigenvectors in feature space [p, r] (covariance
    solver) or in sample space [n, r] (Gram solver, orthonormal columns of ``Zc``'s left
    singular vectors); the absolute ridge ``lam``; and the numerical rank. ``view`` names the view
    in errors ("X", or "X ('left')"), ``reg_name`` its ridge parameter (``reg_x``/``reg_y``).
    """
    n, p = Zc.shape
    col_var = np.einsum("ij,ij->j", Zc, Zc) / (n - 1)
    total_var = float(col_var.sum())  # trace of the covariance
    if total_var == 0.0:  # no ridge can help: there is nothing to correlate
        raise ValueError(
            f"CCA: view {view} is constant: all {p} columns have one value in all {n} rows; CCA needs "
            f"variance in both views (check the features that were passed, e.g. an encoder that returned zeros)"
        )
    lam = reg * total_var / p if reg_mode == "relative" else reg
    if solver == "covariance":
        w, vecs = np.linalg.eigh(Zc.T @ Zc / (n - 1))
    else:
        w, vecs = np.linalg.eigh(Zc @ Zc.T / (n - 1))
    w_max = max(float(w[-1]), 0.0)
    tol = w_max * max(n, p) * np.finfo(np.float64).eps
    keep = w > tol
    rank = int(keep.sum())
    if lam == 0.0 and rank < p:
        hint = f" (n_samples={n} <= n_features={p}: at most n-1 directions have variance)" if n <= p else ""
        const = np.flatnonzero(col_var == 0.0)
        if const.size:
            shown = ", ".join(map(str, const[:20].tolist())) + (", ..." if const.size > 20 else "")
            hint += f"; columns [{shown}] are constant"
        raise np.linalg.LinAlgError(
            f"CCA: the covariance of view {view} is singular: numerical rank {rank} < {p} features{hint}; "
            f"set {reg_name} > 0 (or reg > 0) to regularise, or drop the redundant columns"
        )
    if rank == 0:  # only round-off variance left
        raise ValueError(f"CCA: view {view} has no variance above round-off (numerical rank 0 of {p} columns)")
    return w[keep], vecs[:, keep], lam, rank


def _save_npz(path: str | os.PathLike, state: dict[str, np.ndarray]) -> Path:
    # a file object: np.savez would otherwise append ".npz" to the name
    return write_file_atomically(path, lambda f: np.savez(f, **state))


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
