"""Training data for the Q-Former's ITM on ShapesWorld, and a portable bundle of the ablation's inputs.

* :func:`training_negatives` — NegCLIP-style compositional negatives of **training** scenes only: ``per_image``
  (false caption, true source caption) pairs per scene, written by ShapesWorld's own hard-negative generator
  (attributes swapped between two objects, a relation reversed, one attribute changed; each checked false against
  the scene's facts) from a random stream separate from the data set's, so they are not the data set's own hard
  negatives. The evaluation's hard negatives (of test scenes) are never used for training.
* :func:`save_bundle` / :func:`load_bundle` — the grids, captions, labels, splits, the data set's hard negatives and
  the training negatives in one compressed ``.npz``, so the ablation can run on a machine without the feature
  cache or the data layer (``python -m experiments.qformer_eval --bundle PATH``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


def training_negatives(ds: Any, rows: Sequence[int], per_image: int = 12, seed: int = 1000
                       ) -> tuple[list[list[str]], list[list[str]]]:
    """(negatives, sources): for each scene in ``rows``, ``per_image`` false captions and the true caption each was
    edited from (fewer where a scene has too few distinct edits), by ShapesWorld's generator with its own stream
    ``[seed, row]`` (the data set's hard negatives come from streams ``[data seed, 2, chunk]``)."""
    from experiments.data.shapesworld import _hard_negatives, _Stream

    negs, srcs = [], []
    for r in rows:
        scene = ds.scenes[int(r)]
        try:
            out = _hard_negatives(scene, _Stream([seed, int(r)]), per_image, set(ds.captions[int(r)]))
        except RuntimeError:  # a scene with fewer distinct false edits than asked: keep the ones it has
            out = []
            for k in range(per_image - 1, 0, -1):
                try:
                    out = _hard_negatives(scene, _Stream([seed, int(r)]), k, set(ds.captions[int(r)]))
                    break
                except RuntimeError:
                    continue
        negs.append([n.text for n, _, _ in out])
        srcs.append([s.text for _, _, s in out])
    return negs, srcs


def save_bundle(path: str | Path, ds: Any, grid: np.ndarray, per_image: int = 12, seed: int = 1000) -> Path:
    """Write the ablation's inputs (grid [N, P, d] float16, texts as JSON) to ``path`` (.npz), atomically."""
    from align.weights import write_file_atomically

    tr = np.asarray(ds.splits["train"])
    negs, srcs = training_negatives(ds, tr, per_image, seed)
    text = {"captions": ds.captions, "hard_negatives": ds.hard_negatives,
            "hard_negative_sources": ds.hard_negative_sources, "hard_negative_kinds": ds.hard_negative_kinds,
            "train_negatives": negs, "train_negative_sources": srcs,
            "splits": {k: np.asarray(v).tolist() for k, v in ds.splits.items()}, "fingerprint": ds.fingerprint}
    arrays = {"grid": np.asarray(grid, dtype=np.float16), "label": np.asarray(ds.labels["shape_colour"]),
              "text": np.frombuffer(json.dumps(text).encode(), dtype=np.uint8)}
    return write_file_atomically(Path(path), lambda f: np.savez_compressed(f, **arrays))


def load_bundle(path: str | Path) -> tuple[SimpleNamespace, np.ndarray]:
    """(data, grid): ``data`` has the attributes of ShapesWorld that the ablation reads (captions, hard negatives,
    splits, ``labels["shape_colour"]``) plus ``train_negatives`` / ``train_negative_sources`` (per scene, empty
    lists outside train)."""
    z = np.load(path)
    text = json.loads(z["text"].tobytes().decode())
    n = len(text["captions"])
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in text.pop("splits").items()}
    negs, srcs = [[] for _ in range(n)], [[] for _ in range(n)]
    for r, a, b in zip(splits["train"], text.pop("train_negatives"), text.pop("train_negative_sources")):
        negs[r], srcs[r] = a, b
    data = SimpleNamespace(**text, splits=splits, labels={"shape_colour": z["label"]}, train_negatives=negs,
                           train_negative_sources=srcs)
    return data, z["grid"]
