"""Image–text pair datasets over cached features, for the Trainer and the evaluators.

Every caption row is one training pair with its image row (``text_to_image``), so an image with
five captions appears in five pairs per epoch — the usual practice of VSE++/CLIP training on COCO.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


def take_rows(x: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of an array, tensor, list or any object supporting fancy/slice indexing.

    Numeric numpy arrays (memory-mapped ones included) become float32/int64 tensors; float16
    cached features are widened to float32 here, batch by batch, so the cache stays half size.
    """
    if isinstance(x, np.ndarray):
        rows = np.asarray(x[index])
        if rows.dtype == np.float16:
            rows = rows.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(rows))
    if isinstance(x, Tensor):
        return x[torch.as_tensor(index, dtype=torch.long)]
    if isinstance(x, (list, tuple)):
        return [x[int(i)] for i in index]
    return x[index]  # e.g. align.graphs.GraphTensors


class PairedDataset(Dataset):
    """``ds[i]`` = the i-th caption with its image: ``{"image": image[t2i[i]], "text": text[i], ...}``.

    Args:
        per_image: arrays with one row per image (``"image"``, ``"label"``, ...).
        per_text: arrays with one row per caption (``"text"``, ``"paired"``, ...).
        text_to_image: int [N_text], the image row of each caption.

    Indexing with an array of indices returns a whole batch (the Trainer samples batches of
    indices, so no per-row collation happens: ``indexes_batches``).
    """

    indexes_batches = True

    def __init__(self, per_image: Mapping[str, Any], per_text: Mapping[str, Any], text_to_image: np.ndarray) -> None:
        self.text_to_image = np.asarray(text_to_image, dtype=np.int64)
        n_text, n_image = len(self.text_to_image), None
        for key, arr in per_image.items():
            n_image = len(arr) if n_image is None else n_image
            if len(arr) != n_image:
                raise ValueError(f"per-image array {key!r} has {len(arr)} rows, expected {n_image}")
        for key, arr in per_text.items():
            if len(arr) != n_text:
                raise ValueError(f"per-text array {key!r} has {len(arr)} rows but text_to_image has {n_text}")
        if n_image is not None and n_text and (self.text_to_image.min() < 0 or self.text_to_image.max() >= n_image):
            raise ValueError(f"text_to_image indexes images outside [0, {n_image})")
        self.per_image, self.per_text = dict(per_image), dict(per_text)

    def __len__(self) -> int:
        return len(self.text_to_image)

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> dict[str, Any]:
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        img = self.text_to_image[idx]
        batch = {k: take_rows(v, img) for k, v in self.per_image.items()}
        batch.update({k: take_rows(v, idx) for k, v in self.per_text.items()})
        if np.ndim(index) == 0:
            return {k: v[0] for k, v in batch.items()}
        return batch
