"""``alignfuse bench cca``: closed-form ``align.CCA`` against scikit-learn's NIPALS ``CCA``.

Both fit the same seeded two-view data with a known shared latent; the table gives fit times,
the speed ratio, and per-component canonical correlations on the training data and on
held-out data (``mean``/``min`` over components), next to the population correlations of the
generating model.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings

import numpy as np

log = logging.getLogger(__name__)

HELP = "closed-form CCA vs scikit-learn's CCA: fit time and canonical correlations (train and held-out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=int, default=20_000, help="training rows")
    parser.add_argument("--n-test", type=int, default=5_000, help="held-out rows")
    parser.add_argument("--dim", type=int, default=256, help="features per view")
    parser.add_argument("--n-components", type=int, default=32, help="canonical pairs to fit")
    parser.add_argument("--latent-dim", type=int, default=48, help="shared latent factors of the two views")
    parser.add_argument("--private-dim", type=int, default=32, help="strong view-specific factors per view")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reg", type=float, default=None,
                        help="relative ridge of align.CCA (None: the class default, 1e-6)")
    parser.add_argument("--also-reg", type=float, nargs="*", default=[1e-3], metavar="REG",
                        help="also time align.CCA with these relative ridges (held-out correlations)")
    parser.add_argument("--repeats", type=int, default=5, help="align.CCA fits timed (best is reported)")
    parser.add_argument("--sklearn-max-iter", type=int, default=500,
                        help="max_iter of sklearn's CCA (500 is sklearn's default)")
    parser.add_argument("--skip-sklearn", action="store_true", help="time align.CCA only")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads for both fits (threadpoolctl); default: the library default")


def make_two_views(n: int, dim: int, latent_dim: int, private_dim: int, seed: int):
    """Two views sharing ``latent_dim`` factors of geometrically decaying strength.

    ``X = s A_x + p_x P_x + e_x`` (and likewise Y), with shared ``s``, view-specific ``p`` (larger
    variance than ``s``, so the top principal directions are not the correlated ones) and unit
    isotropic noise ``e``. Returns ``X, Y`` [n, dim] and the population canonical correlations.
    """
    rng = np.random.default_rng(seed)
    strength = np.geomspace(3.0, 0.15, latent_dim)
    scale = 4.0 / np.sqrt(dim)
    A = [rng.normal(size=(latent_dim, dim)) * scale for _ in range(2)]
    P = [rng.normal(size=(private_dim, dim)) * 3 * scale for _ in range(2)]
    s = rng.normal(size=(n, latent_dim)) * strength
    X, Y = (s @ A[i] + rng.normal(size=(n, private_dim)) @ P[i] + rng.normal(size=(n, dim)) for i in range(2))
    S2 = np.diag(strength**2)
    Cxx, Cyy = (A[i].T @ S2 @ A[i] + P[i].T @ P[i] + np.eye(dim) for i in range(2))
    Cxy = A[0].T @ S2 @ A[1]
    Lx, Ly = np.linalg.cholesky(Cxx), np.linalg.cholesky(Cyy)
    rho = np.linalg.svd(np.linalg.solve(Lx, np.linalg.solve(Ly, Cxy.T).T), compute_uv=False)
    return X, Y, rho


def _corr(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    U, V = U - U.mean(0), V - V.mean(0)
    return (U * V).sum(0) / (np.linalg.norm(U, axis=0) * np.linalg.norm(V, axis=0))


def _stats(c: np.ndarray) -> dict:
    return {"mean": float(c.mean()), "min": float(c.min()), "per_component": [float(v) for v in c]}


def _time_ours(CCA, k: int, reg: float | None, repeats: int, Xtr, Ytr, Xte, Yte) -> dict:
    """Best-of-``repeats`` fit time and correlations of ``align.CCA`` (``reg=None``: the class default)."""
    kw = {} if reg is None else {"reg": reg}
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        model = CCA(k, **kw).fit(Xtr, Ytr)
        times.append(time.perf_counter() - t0)
    return {"fit_s": min(times), "fit_s_all": times, "solver": model.solver_, "reg": model.reg,
            "train_corr": _stats(model.correlations_), "test_corr": _stats(model.score(Xte, Yte))}


def _compare(o: dict, s: dict) -> dict:
    out = {}
    for split in ("train", "test"):
        a = np.array(o[f"{split}_corr"]["per_component"])
        b = np.array(s[f"{split}_corr"]["per_component"])
        out[split] = {
            "mean_diff": float(a.mean() - b.mean()),
            "components_ge": int((a >= b).sum()),
            # exact CCA maximises every partial sum of the top-j training correlations
            "prefix_sums_ge": int((np.cumsum(a) >= np.cumsum(b) - 1e-9).sum()),
            "max_abs_component_diff": float(np.abs(a - b).max()),
        }
    return out


def run(args: argparse.Namespace) -> dict:
    from sklearn.cross_decomposition import CCA as SkCCA
    from threadpoolctl import threadpool_limits

    from align.cca import CCA

    n, k = args.n_train, args.n_components
    X, Y, rho = make_two_views(n + args.n_test, args.dim, args.latent_dim, args.private_dim, args.seed)
    data = (X[:n], Y[:n], X[n:], Y[n:])
    limits = threadpool_limits(args.threads) if args.threads else contextlib.nullcontext()
    figures: dict = {"config": {k_: v for k_, v in vars(args).items() if not k_.startswith("_")}}
    with limits:
        ours = {"ours": _time_ours(CCA, k, args.reg, args.repeats, *data)}
        for r in args.also_reg:
            ours[f"ours_reg={r:g}"] = _time_ours(CCA, k, r, args.repeats, *data)
        figures.update(ours)
        if not args.skip_sklearn:
            sk = SkCCA(n_components=k, max_iter=args.sklearn_max_iter)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                sk.fit(data[0], data[1])
                sk_time = time.perf_counter() - t0
            n_warn = sum("did not converge" in str(w.message) for w in caught)
            figures["sklearn"] = {"fit_s": sk_time, "max_iter": args.sklearn_max_iter,
                                  "components_not_converged": n_warn,
                                  "train_corr": _stats(_corr(*sk.transform(data[0], data[1]))),
                                  "test_corr": _stats(_corr(*sk.transform(data[2], data[3])))}
    figures["population_corr"] = _stats(rho[:k])

    print(f"CCA benchmark: n_train={n} n_test={args.n_test} dim={args.dim}x{args.dim} "
          f"n_components={k} seed={args.seed} threads={args.threads or 'default'}")
    print(f"population canonical correlations (top {k}): mean {rho[:k].mean():.4f} min {rho[:k].min():.4f}")
    print(f"{'':46s}{'fit s':>10s}{'train mean':>12s}{'train min':>11s}{'test mean':>11s}{'test min':>10s}")
    rows = [(f"align.CCA reg={f['reg']:g} ({f['solver']}, best of {len(f['fit_s_all'])})", f) for f in ours.values()]
    if "sklearn" in figures:
        rows.append((f"sklearn CCA (max_iter={args.sklearn_max_iter})", figures["sklearn"]))
    for name, f in rows:
        print(f"{name:46s}{f['fit_s']:10.3f}{f['train_corr']['mean']:12.6f}{f['train_corr']['min']:11.6f}"
              f"{f['test_corr']['mean']:11.6f}{f['test_corr']['min']:10.6f}")
    if "sklearn" in figures:
        s = figures["sklearn"]
        print(f"sklearn components not converged: {s['components_not_converged']}")
        for key, o in ours.items():
            o["speedup"] = s["fit_s"] / o["fit_s"]
            o["minus_sklearn"] = _compare(o, s)
            print(f"align.CCA reg={o['reg']:g}: {o['speedup']:.0f}x faster than sklearn")
            for split, c in o["minus_sklearn"].items():
                print(f"  {split}: mean corr - sklearn's = {c['mean_diff']:+.2e}; >= sklearn on "
                      f"{c['components_ge']}/{k} components and {c['prefix_sums_ge']}/{k} top-j sums; "
                      f"largest per-component gap {c['max_abs_component_diff']:.1e}")
        figures["speedup"] = figures["ours"]["speedup"]
    return figures
