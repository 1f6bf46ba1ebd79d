"""Reports: aggregate results over seeds, write Markdown tables and PNG plots.

Plots are written with matplotlib's Agg backend (no display needed); every function that writes
a picture returns its path so the caller can link it relatively from ``report.md``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from align.weights import write_file_atomically  # noqa: E402


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value: one seed has no spread to report)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan, None
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None


def aggregate_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every numeric leaf of nested dicts, plus ``<key>_std`` beside each.

    ``runs`` are per-seed result dicts of identical structure; non-numeric leaves are taken from the first.
    """
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, Mapping):
            out[key] = aggregate_seeds([r[key] for r in runs])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            m, s = mean_std(r[key] for r in runs)
            out[key] = m
            out[f"{key}_std"] = s
        else:
            out[key] = value
    return out


def fmt(mean: float, std: float | None = None, digits: int = 1) -> str:
    """``12.3 ± 0.4`` (or just the mean where std is None or NaN, e.g. a one-seed run)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``align`` is one char per column from 'lrc'."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep[a] for a in align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_file_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _save(fig, path: str | Path) -> Path:
    try:
        return write_file_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def grouped_bars(path: str | Path, groups: Sequence[str], series: Mapping[str, Sequence[float]],
                 errors: Mapping[str, Sequence[float]] | None = None, ylabel: str = "", title: str = "") -> Path:
    """Bars per group (x axis), one colour per series (e.g. groups=aligners, series=R@1/R@5/R@10)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        err = errors.get(name) if errors else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, yerr=err, label=name, capsize=2)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def curves(path: str | Path, lines: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
           ylabel: str, title: str = "", logy: bool = False, styles: Mapping[str, str] | None = None) -> Path:
    """Line plot of named (x, y) series on a shared axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (xs, ys) in lines.items():
        ax.plot(xs, ys, (styles or {}).get(name, "-"), label=name, marker="o" if len(xs) < 15 else None, ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curve_panels(path: str | Path, panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                 xlabel: str, ylabel: str, title: str = "", styles: Mapping[str, str] | None = None,
                 colours: Mapping[str, str] | None = None, ncols: int = 3) -> Path:
    """Small multiples: one panel per key of ``panels`` (each a ``curves``-style mapping of named series),
    a shared y axis, and one colour per series name across panels (so "seeded val" looks the same everywhere;
    ``colours`` overrides it per name, e.g. one colour for a run's train and val lines)."""
    names = list(dict.fromkeys(n for lines in panels.values() for n in lines))
    cmap = plt.get_cmap("tab10")
    colour = {n: (colours or {}).get(n, cmap(i % 10)) for i, n in enumerate(names)}
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, (styles or {}).get(name, "-"), color=colour[name], label=name,
                    marker="o" if len(xs) < 15 else None, ms=3)
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(panels):]
    if spare:  # the legend goes into the first empty panel
        spare[0].legend(handles, labels, loc="center", fontsize=8)
    else:
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=len(labels))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def shared_space_map(path: str | Path, image_emb: np.ndarray, text_emb: np.ndarray, image_labels: Sequence[str],
                     text_labels: Sequence[str], title: str = "") -> Path:
    """2-D PCA map of image (circles) and text (crosses) points of a shared space, coloured by class."""
    z = np.concatenate([image_emb, text_emb]).astype(np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    z -= z.mean(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    xy = z @ vt[:2].T
    classes = sorted(set(image_labels) | set(text_labels))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6, 5))
    n = len(image_emb)
    for ci, c in enumerate(classes):
        im = [i for i, l in enumerate(image_labels) if l == c]
        tx = [n + i for i, l in enumerate(text_labels) if l == c]
        ax.scatter(xy[im, 0], xy[im, 1], s=14, color=cmap(ci % 10), marker="o", alpha=0.7, label=f"{c} (image)")
        ax.scatter(xy[tx, 0], xy[tx, 1], s=22, color=cmap(ci % 10), marker="x", alpha=0.9)
    ax.set_title(title or "shared space (PCA): o image, x text")
    ax.legend(fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def image_grid(path: str | Path, images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], ncols: int = 4,
               title: str = "", width: int = 44) -> Path:
    """Images (uint8 [H,W,3]) with their lines of text (wrapped at ``width`` characters) under each."""
    import textwrap

    wrapped = ["\n".join(textwrap.fill(line, width) for line in lines) for lines in captions]
    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    text_lines = max((w.count("\n") + 1 for w in wrapped), default=1)
    fig, axes = plt.subplots(nrows * 2, ncols, figsize=(3.6 * ncols, (2.8 + 0.16 * text_lines) * nrows), squeeze=False,
                             gridspec_kw={"height_ratios": [2.8, 0.16 * text_lines] * nrows})
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, text) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, ncols)
        axes[2 * r, c].imshow(img)
        axes[2 * r + 1, c].text(0.0, 1.0, text, fontsize=7, va="top", ha="left", family="monospace",
                                transform=axes[2 * r + 1, c].transAxes)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
