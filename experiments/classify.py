"""Scoring a fitted classifier of the fusion comparison: accuracy and macro-F1, missing and noised modalities at
several rates, parameter counts and latency. Works for ``nn.Module`` strategies and scikit-learn combiners alike."""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import fusion
from fusion._common import batch_size

CORRUPTIONS = ("drop", "noise")


def predict_proba(model: Any, inputs: Mapping[str, Any], n: int | None = None, chunk: int = 512) -> np.ndarray:
    """Class probabilities [N, C] of any strategy for a dict of numpy inputs (masks included); ``n`` is needed only
    when every modality of the model is absent."""
    if not isinstance(model, nn.Module):
        return np.asarray(model.predict_proba(inputs))
    device = next(model.parameters()).device
    n = batch_size(inputs, model.modalities) if n is None else n
    out = []
    for i in range(0, n, chunk):
        batch = {k: torch.as_tensor(np.asarray(v[i:i + chunk])).to(device) for k, v in inputs.items() if v is not None}
        if not any(m in batch for m in model.modalities):  # every modality absent: a mask gives the size
            batch[fusion.mask_key(model.modalities[0])] = torch.zeros(min(chunk, n - i), dtype=torch.bool)
        out.append(model.predict_proba(batch).float().cpu().numpy())  # eval mode, no grad, mode restored
    return np.concatenate(out)


def metrics(proba: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = proba.argmax(axis=1)
    return {"accuracy": 100.0 * float((pred == y).mean()),
            "macro_f1": 100.0 * float(f1_score(y, pred, average="macro", labels=np.arange(num_classes),
                                               zero_division=0))}


def accuracy(model: Any, inputs: Mapping[str, Any], y: np.ndarray) -> float:
    return 100.0 * float((predict_proba(model, inputs, len(y)).argmax(axis=1) == y).mean())


def model_inputs(model: Any, views: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {m: views[m] for m in model.modalities if m in views}


def corrupt(inputs: Mapping[str, np.ndarray], modality: str, how: str, rate: float, *, noise_std: float,
            noise_scale: Any, seed: int, pixels: bool = False) -> dict[str, np.ndarray]:
    """``inputs`` with a fraction ``rate`` of the rows of ``modality`` dropped or noised.

    The corrupted rows are the first ``round(rate * N)`` of a permutation fixed by ``seed`` (so the sets are
    nested across rates and equal across strategies). ``drop``: ``"<modality>_mask"`` bool [N] is False on
    them. ``noise``: Gaussian noise of std ``noise_std * noise_scale`` (broadcast over the last axis) is
    added to them; ``pixels`` inputs (uint8) come back as float in [0, 1] after clipping to [0, 255].
    """
    x = inputs[modality]
    n = len(x)
    rng = np.random.default_rng([seed, 7])
    hit = np.zeros(n, dtype=bool)
    hit[rng.permutation(n)[: int(round(rate * n))]] = True
    out = dict(inputs)
    if how == "drop":
        out[fusion.mask_key(modality)] = ~hit
        return out
    if how != "noise":
        raise ValueError(f"unknown corruption {how!r}; known: {CORRUPTIONS}")
    noisy = np.asarray(x, dtype=np.float32).copy()
    if hit.any():
        scale = np.asarray(noise_std * np.asarray(noise_scale, dtype=np.float32), dtype=np.float32)
        eps = np.random.default_rng([seed, 8]).standard_normal(noisy[hit].shape, dtype=np.float32)
        noisy[hit] += eps * scale
    if pixels:
        noisy = np.clip(noisy, 0.0, 255.0) / 255.0
    out[modality] = noisy.astype(x.dtype) if x.dtype == np.float16 else noisy
    return out


def latency(model: Any, inputs: Mapping[str, np.ndarray], n: int) -> float:
    """ms per sample at batch size 1 (median over ``n`` samples, after one warm-up call)."""
    n = min(n, batch_size(inputs, model.modalities))
    one = lambda i: {k: v[i:i + 1] for k, v in inputs.items()}  # noqa: E731
    predict_proba(model, one(0))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        predict_proba(model, one(i))
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def evaluate_classifier(model: Any, kind: str, task: Any, rates: list[float], noise_std: float, seed: int,
                        latency_samples: int) -> dict[str, Any]:
    """Clean test and validation metrics, missing modalities, corruption curves (noise and corrupted rows
    drawn from ``seed``) and cost of a fitted strategy."""
    views = task.views[kind]
    mods = tuple(m for m in model.modalities if m in task.modalities)
    test = model_inputs(model, views["test"])
    y = task.labels["test"]
    t0 = time.perf_counter()
    proba = predict_proba(model, test)
    throughput_ms = 1000.0 * (time.perf_counter() - t0) / len(y)
    out: dict[str, Any] = {**metrics(proba, y, task.num_classes),
                           "val_accuracy": accuracy(model, model_inputs(model, views["val"]), task.labels["val"])}
    clean = out["accuracy"]

    out["missing_modality"] = {}
    for m in task.modalities:
        out["missing_modality"][m] = (accuracy(model, {k: v for k, v in test.items() if k != m}, y)
                                      if m in mods else clean)
    rates = sorted(set(float(r) for r in rates))
    out["robustness"] = {"rates": [100.0 * r for r in rates]}
    for how in CORRUPTIONS:
        curves = {}
        for j, m in enumerate(task.modalities):
            if m not in mods:
                curves[m] = [clean] * len(rates)
                continue
            curves[m] = [
                accuracy(model, corrupt(test, m, how, r, noise_std=noise_std,
                                         noise_scale=task.noise_scale[kind][m], seed=seed * 1000 + j,
                                         pixels=kind == "pixels"), y)
                for r in rates
            ]
        out["robustness"][how] = curves

    out.update(
        params=fusion.model_params(model),
        fusion_params=fusion.fusion_module_params(model),
        latency_ms=latency(model, test, latency_samples),
        throughput_ms=throughput_ms,
    )
    return out
