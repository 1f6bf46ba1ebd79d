"""Training data for the Trainer: :class:`DictDataset` (a dict of equal-length arrays, indexed by whole batches),
:class:`EpochBatchSampler` (a shuffle that depends only on ``(seed, epoch)``, resumable mid-epoch), moving
batches to the device and gathering whole arrays for closed-form fits."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, Sampler


class DictDataset(Dataset):
    """Rows of equal-length arrays: ``ds[i] == {key: arrays[key][i]}``.

    Values may be tensors, numpy arrays (numeric ones become tensors, sharing memory) or
    sequences such as lists of strings. Indexing with a list/array of indices returns a whole
    batch by fancy indexing (``ds[[0, 5, 2]] == {key: arrays[key][[0, 5, 2]]}``), which the
    Trainer's DataLoader uses instead of collating row by row.
    """

    indexes_batches = True

    def __init__(self, arrays: Mapping[str, Tensor | np.ndarray | Sequence]):
        if not arrays:
            raise ValueError("train_data is an empty dict; expected {modality: array [N, ...]}")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
            raise ValueError(f"train_data arrays must have equal lengths, got {detail}")
        self.arrays: dict[str, Tensor | list] = {}
        for k, v in arrays.items():
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
                v = torch.from_numpy(np.ascontiguousarray(v))
            elif not isinstance(v, Tensor):
                v = list(v)
            self.arrays[k] = v
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int | Sequence[int] | Tensor) -> dict[str, Any]:
        if isinstance(i, (int, np.integer)) or (isinstance(i, Tensor) and i.ndim == 0):
            return {k: v[i] for k, v in self.arrays.items()}
        idx = torch.as_tensor(i, dtype=torch.long)
        return {k: v[idx] if isinstance(v, Tensor) else [v[j] for j in idx.tolist()] for k, v in self.arrays.items()}


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches of one epoch: a shuffle that depends only on ``(seed, epoch)``.

    The permutation and the rank sharding are those of ``DistributedSampler`` (padding with
    repeated indices so every rank gets as many batches; truncating instead with
    ``drop_last``). ``set_epoch(epoch, skip)`` selects the epoch and skips its first
    ``skip`` batches, which is how a resumed run continues mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=drop_last)
        self._skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self._sampler.set_epoch(epoch)
        self._skip = skip

    def batches_per_epoch(self) -> int:
        n = self._sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self._skip)

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self._sampler)
        for b in range(self._skip, self.batches_per_epoch()):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return type(x)(to_device(v, device) for v in x)
    return x



def as_dataset(train_data: Any) -> Dataset:
    """``train_data`` as a map-style Dataset (a dict of arrays becomes a :class:`DictDataset`)."""
    if isinstance(train_data, Mapping):
        return DictDataset(train_data)
    if isinstance(train_data, IterableDataset) or not isinstance(train_data, Dataset):
        raise TypeError(f"train_data must be a map-style Dataset of dict samples or a dict of arrays, "
                        f"got {type(train_data).__name__}")
    return train_data
