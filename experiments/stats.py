"""Statistics over seeds: paired t-tests and bootstrap confidence intervals (scipy); mean ± std and seed
aggregation are :func:`experiments.report.mean_std` / :func:`experiments.report.aggregate_seeds`."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def paired_pvalues(per_seed: Mapping[str, Sequence[float]], ref: str) -> dict[str, float]:
    """Two-sided paired t-test (``scipy.stats.ttest_rel``) of every entry's per-seed values against ``ref``'s.

    NaN for ``ref`` itself, with fewer than 2 seeds, or when the per-seed differences are constant (undefined).
    """
    from scipy import stats

    a = np.asarray(per_seed[ref], dtype=float)
    out = {}
    for name, values in per_seed.items():
        b = np.asarray(values, dtype=float)
        diff = a - b
        if name == ref or len(a) < 2 or np.allclose(diff, diff[0]):
            out[name] = math.nan
        else:
            out[name] = float(stats.ttest_rel(a, b).pvalue)
    return out


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (``scipy.stats.bootstrap``); (nan, nan) for fewer than 2 values."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2 or np.allclose(v, v[0]):
        return (math.nan, math.nan) if len(v) < 2 else (float(v[0]), float(v[0]))
    res = stats.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
