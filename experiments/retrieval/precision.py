"""Which precision scores the blocks (bf16 or float32), and the proven bound on its error.

The ranks are those of float64 scoring (:func:`experiments.retrieval.inputs.dot64` of the rows
normalised in float64). The big GEMM runs in a lower precision ``p`` (the *filter*); every
comparison whose filter score lies within a proven bound ``delta`` of the query's exact float64
threshold is re-scored in float64. The bound, for a query row ``x`` against a gallery row ``y``
(exact float64 rows; ``x~``, ``y~`` their copies rounded to ``p``; ``s = x.y`` in exact arithmetic;
``s~`` what the GEMM returns):

1. inputs: ``x~.y~ - x.y = x~.(y~ - y) + (x~ - x).y``, so by Cauchy-Schwarz
   ``|x~.y~ - x.y| <= |x~| |y~ - y| + |x~ - x| |y|``. The four norms are *measured* per row in
   float64 (no assumption on how ``x~`` was rounded: bf16 or float32, round-to-nearest or not);
2. accumulation: the GEMM forms the products and sums them in float32 (bf16 products are exact
   in float32; oneDNN/MKL and cuBLAS accumulate bf16 in float32, and we switch off cuBLAS's
   reduced-precision bf16 reductions and TF32 for the call). In any summation order, with or
   without FMA, ``|fl(sum) - sum| <= gamma_D sum |x~_k y~_k| <= gamma_D |x~| |y~|`` with
   ``gamma_D = D u / (1 - D u)``, ``u = 2**-24`` (Higham, *Accuracy and Stability*, 3.1);
3. output: a bf16 output (CPU ``torch.mm`` of bf16 tensors) is rounded once more:
   ``+ 2**-8 |x~| |y~| (1 + gamma_D)``; float32 outputs add nothing;
4. the float64 re-scoring and thresholds carry their own ``gamma_D`` with ``u = 2**-53``, and
   flushed subnormals at most ``(2D + 1) 2**-126``;
5. the sum is taken with per-query maxima over the gallery (``max |y~ - y|``, ``max |y|``,
   ``max |y~|``), enlarged by ``2**-20`` relative, and the float32 thresholds ``t - delta``,
   ``t + delta`` are rounded outwards.

A filter score above ``t + delta`` is then certainly above ``t`` in float64; one below
``t - delta`` is certainly below; only those in between are re-scored. For unit rows this is
``delta ~ 2 |x~ - x| + 2**-8 + 3e-5`` in bf16 (about 0.007 at D = 512) and ``~ 3e-5`` in float32.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
_U32 = 2.0**-24
_U64 = 2.0**-53
_U_BF16 = 2.0**-8
#: bf16 must beat float32 by this factor in the one-off measurement to be chosen on a CPU
BF16_MIN_SPEEDUP = 1.25


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Whether a bf16 GEMM beats float32 on this CPU: needs AMX or AVX-512 bf16 (``/proc/cpuinfo``)
    and oneDNN, then one timing of each (about a second, once per process). Without the
    instructions bf16 is emulated and several times slower, so nothing is timed."""
    flags = _cpu_flags()
    if not ({"amx_bf16", "avx512_bf16"} & flags) or not torch.backends.mkldnn.is_available():
        log.debug("no AMX/AVX-512 bf16 on this CPU: bf16 would be emulated")
        return False
    a32, b32 = torch.randn(2048, 512), torch.randn(8192, 512)
    t32, t16 = _best_time(a32, b32), _best_time(a32.bfloat16(), b32.bfloat16())
    log.info("bf16 GEMM %.1fx the speed of float32 on this CPU", t32 / t16)
    return t32 / t16 >= BF16_MIN_SPEEDUP


def _best_time(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    """Best wall time of ``a @ b.T`` over ``repeats`` runs after one warm-up."""
    torch.mm(a, b.T)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b.T)
        best = min(best, time.perf_counter() - t0)
    return best


def choose_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"`` for the filter GEMM: ``auto`` is bf16 on CUDA devices that support
    it and on CPUs where :func:`cpu_bf16_is_faster`, float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    return "fp32"


@contextlib.contextmanager
def exact_matmul_settings(device: torch.device):
    """Float32 GEMMs in true float32 (no TF32, no bf16 passes) and bf16 GEMMs with float32
    reductions, for the duration of the block; restores the caller's settings."""
    prev = torch.get_float32_matmul_precision()
    cuda = device.type == "cuda"
    if cuda:
        prev_red = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
        if cuda:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = prev_red


class FilterSide:
    """Rows of ``x`` (:class:`~experiments.retrieval.inputs.Rows`: exact, float64) with their filter
    copy and the measured terms of the bound: per row ``err`` ``|x~ - x|``, ``norm`` ``|x|`` and
    ``fnorm`` ``|x~|`` (float64 [N]), all from the one scan of the rows, which also calls
    ``visit(start, exact rows)``."""

    def __init__(self, x, name: str, normalize: bool, degenerate: str, precision: str, device: torch.device,
                 visit=None) -> None:
        from .inputs import Rows, _shape

        self.precision, self.device = precision, device
        n = _shape(x)[0]
        self.err, self.fnorm, self.norm = np.empty(n), np.empty(n), np.empty(n)

        def measure(s: int, exact: np.ndarray) -> None:
            if precision == "fp32":  # rounding to float32 is known well enough: no need to measure
                if visit is not None:
                    visit(s, exact)
                return
            approx = self._round(exact)
            diff = approx - exact
            e = s + len(exact)
            self.err[s:e] = np.sqrt((diff * diff).sum(1))
            self.fnorm[s:e] = np.sqrt((approx * approx).sum(1))
            self.norm[s:e] = np.sqrt((exact * exact).sum(1))
            if visit is not None:
                visit(s, exact)

        self.rows = Rows(x, name, normalize, degenerate, visit=measure)
        if precision == "fp32":
            # |x| from the float64 norms (normalised rows: 1 up to D + 2 roundings of 2**-53 each);
            # round-to-nearest float32 moves each element by at most 2**-24 of itself (subnormals:
            # by 2**-150, inside the bound's constant term), so |x~ - x| <= 2**-24 |x|
            r = self.rows
            self.norm = np.where(r.norms == 0, 0.0, 1.0) if normalize else r.norms.copy()
            self.norm *= 1.0 + 2.0**-40
            self.err = _U32 * self.norm
            self.fnorm = (1.0 + _U32) * self.norm

    def _round(self, exact: np.ndarray) -> np.ndarray:
        """The filter values of exact rows, back in float64 (exactly representable)."""
        x32 = exact.astype(np.float32)
        if self.precision == "bf16":
            return torch.from_numpy(x32).bfloat16().double().numpy()
        return x32.astype(np.float64)

    def tensor(self, key) -> torch.Tensor:
        """Filter rows ``[n, D]`` on the scoring device (bf16 or float32)."""
        t = torch.from_numpy(self.rows.get(key).astype(np.float32)).to(self.device)
        return t.bfloat16() if self.precision == "bf16" else t

    def maxima(self) -> tuple[float, float, float]:
        """(max err, max norm, max fnorm) over the rows, the gallery terms of the bound."""
        return float(self.err.max()), float(self.norm.max()), float(self.fnorm.max())


def score_bounds(query: FilterSide, gallery: FilterSide, dim: int, bf16_output: bool) -> np.ndarray:
    """``delta`` [N_query] float64: ``|filter score - float64 score| <= delta`` for every gallery
    item (see the module docstring for the derivation)."""
    g_err, g_norm, g_fnorm = gallery.maxima()
    gamma32, gamma64 = _gamma(dim, _U32), _gamma(dim, _U64)
    out_u = _U_BF16 if bf16_output else 0.0
    delta = (query.fnorm * g_err + query.err * g_norm
             + (gamma32 + out_u * (1.0 + gamma32)) * query.fnorm * g_fnorm
             + 2.0 * gamma64 * query.norm * g_norm
             + (2 * dim + 1) * 2.0**-126)
    return delta * (1.0 + 2.0**-20)


def float32_band(threshold: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ``(lo, hi)`` with ``lo <= threshold - delta`` and ``hi >= threshold + delta`` (rounded
    outwards); infinite thresholds (padding) stay infinite on both sides."""
    lo = (threshold - delta).astype(np.float32)
    hi = (threshold + delta).astype(np.float32)
    lo = np.nextafter(lo, np.float32(-np.inf))
    hi = np.nextafter(hi, np.float32(np.inf))
    inf = np.isinf(threshold)
    lo[inf] = threshold[inf]
    hi[inf] = threshold[inf]
    return lo, hi
