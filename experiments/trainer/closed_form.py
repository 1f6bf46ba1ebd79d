"""The Trainer's closed-form path: a model with ``fit`` and no ``loss`` is fitted once on the whole training set
(``fit(X, Y)`` on its two ``modalities``, or ``fit(batch)`` with ``fit_input = "batch"``), then evaluated."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader

from experiments import distributed as D
from experiments.trainer.config import TrainResult
from experiments.trainer.data import DictDataset

log = logging.getLogger("experiments.trainer")


class ClosedFormMixin:
    """Closed-form fitting methods of :class:`experiments.trainer.Trainer`."""

    config: Any
    collate_fn: Any
    evaluator: Any

    def _fit_closed_form(self, model: Any, train_data: Any) -> TrainResult:
        cfg = self.config
        t0 = time.perf_counter()
        if getattr(model, "fit_input", "pair") == "batch":  # e.g. decision-level fusion: fit(inputs dict)
            batch = self._gather_all(train_data)
            log.info("fitting %s in closed form on %d samples (%s)", type(model).__name__,
                     len(next(iter(batch.values()))), ", ".join(sorted(batch)))
            model.fit(batch)
        else:
            modalities = getattr(model, "modalities", None)
            if modalities is None or len(modalities) != 2:
                raise TypeError(f"closed-form model {type(model).__name__} must define modalities=(a, b) "
                                f"(or fit_input = 'batch' to get the whole training dict), got {modalities!r}")
            X, Y = (self._gather(train_data, m) for m in modalities)
            log.info("fitting %s in closed form on %d samples (%s %s, %s %s)", type(model).__name__, len(X),
                     modalities[0], X.shape, modalities[1], Y.shape)
            model.fit(X, Y)
        metrics = self._evaluate(model) if self.evaluator is not None else None
        seconds = time.perf_counter() - t0
        history = []
        if metrics is not None:
            history.append({"kind": "eval", "step": 0, "epoch": 1.0, "elapsed": round(seconds, 3), **metrics})
            log.info("%s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if cfg.out_dir is not None and D.is_main_process():
            out_dir = Path(cfg.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        return TrainResult(history=history, best_metrics=metrics, best_step=0 if metrics else None,
                           final_metrics=metrics, train_seconds=seconds, n_trainable=0, steps=0)

    def _gather_all(self, train_data: Any) -> dict[str, Any]:
        """Every training array as numpy [N, ...] (lists stay lists), for models that fit on the whole dict."""
        if isinstance(train_data, Mapping):
            DictDataset(train_data)  # validates equal lengths
            return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else
                    (v if isinstance(v, list) else np.asarray(v)) for k, v in train_data.items()}
        dataset = self._as_dataset(train_data)
        if not getattr(dataset, "indexes_batches", False):
            raise TypeError(f"a model with fit_input='batch' needs a dict of arrays or a dataset that indexes "
                            f"batches, got {type(dataset).__name__}")
        batch = dataset[np.arange(len(dataset))]
        return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _gather(self, train_data: Any, modality: str) -> np.ndarray:
        """The full training array of one modality as numpy [N, ...]."""
        if isinstance(train_data, Mapping):
            if modality not in train_data:
                raise KeyError(f"train_data has no {modality!r} array (has {sorted(train_data)})")
            DictDataset(train_data)  # validates equal lengths
            v = train_data[modality]
            return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        dataset = self._as_dataset(train_data)
        if getattr(dataset, "indexes_batches", False):
            batch = dataset[np.arange(len(dataset))]
            if modality not in batch:
                raise KeyError(f"train_data samples have no {modality!r} field (have {sorted(batch)})")
            v = batch[modality]
            return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        loader = DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False, collate_fn=self.collate_fn,
                            num_workers=self.config.num_workers)
        parts = []
        for batch in loader:
            if modality not in batch:
                raise KeyError(f"train_data samples have no {modality!r} field (have {sorted(batch)})")
            v = batch[modality]
            parts.append(v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
        return np.concatenate(parts)
