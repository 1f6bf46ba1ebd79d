"""load_multiview: .npz and directory layouts, split files, and the errors that name file and shape."""
from __future__ import annotations

import numpy as np
import pytest

from experiments.data import DATASETS, MultiViewData, load_dataset, load_multiview


def _arrays(n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gene": rng.normal(size=(n, 5)).astype(np.float64),
        "imu": rng.normal(size=(n, 3, 7)).astype(np.float32),
        "labels": np.arange(n) % 4,
    }


def test_npz_default_splits_are_stratified_disjoint_and_complete(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays())
    d = load_multiview(tmp_path / "d.npz", val_fraction=0.1, test_fraction=0.2, seed=3)
    assert isinstance(d, MultiViewData) and d.modalities == ["gene", "imu"]
    assert d.views["gene"].dtype == np.float32 and d.views["imu"].shape == (40, 3, 7)
    assert d.labels.dtype == np.int64 and d.class_names == ["0", "1", "2", "3"]
    allrows = np.concatenate([d.splits[s] for s in ("train", "val", "test")])
    assert sorted(allrows.tolist()) == list(range(40))
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [28, 4, 8]
    assert all((np.diff(d.splits[s]) > 0).all() for s in d.splits)
    assert np.bincount(d.labels[d.splits["test"]]).tolist() == [2, 2, 2, 2]
    again = load_multiview(tmp_path / "d.npz", val_fraction=0.1, test_fraction=0.2, seed=3)
    assert again.fingerprint == d.fingerprint and np.array_equal(again.splits["val"], d.splits["val"])
    other = load_multiview(tmp_path / "d.npz", seed=4)
    assert other.fingerprint != d.fingerprint


def test_directory_with_split_file_and_class_names(tmp_path):
    arrs = _arrays()
    for k, v in arrs.items():
        np.save(tmp_path / f"{k}.npy", v)
    (tmp_path / "class_names.txt").write_text("a\nb\nc\nd\n")
    split = np.array(["train"] * 30 + ["val"] * 4 + ["test"] * 6)
    np.save(tmp_path / "split.npy", split)
    d = load_dataset("multiview", path=tmp_path)
    assert DATASETS["multiview"] is load_multiview
    assert d.class_names == ["a", "b", "c", "d"]
    assert d.splits["val"].tolist() == list(range(30, 34)) and d.splits["test"].tolist() == list(range(34, 40))


def test_splits_npz_without_val_carves_val_from_train(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays())
    np.savez(tmp_path / "s.npz", train=np.arange(0, 32), test=np.arange(32, 40))
    d = load_multiview(tmp_path / "d.npz", split_path=tmp_path / "s.npz", val_fraction=0.1)
    assert d.splits["test"].tolist() == list(range(32, 40))
    assert len(d.splits["val"]) == 4 and set(d.splits["val"]) <= set(range(32))
    assert not set(d.splits["val"]) & set(d.splits["train"])


def test_noncontiguous_labels_are_remapped_with_their_values_as_names(tmp_path):
    a = _arrays()
    a["labels"] = (a["labels"] + 1) * 10
    np.savez(tmp_path / "d.npz", **a)
    d = load_multiview(tmp_path / "d.npz")
    assert d.class_names == ["10", "20", "30", "40"] and d.labels.max() == 3


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(gene=a["gene"][:39]), r"'gene' has 39 rows .*shape \(39, 5\).*labels have 40"),
    (lambda a: a["gene"].__setitem__((7, 2), np.nan), r"'gene' row 7 contains NaN"),
    (lambda a: a.update(labels=a["labels"].astype(float)), "labels must be integers, got dtype float64"),
    (lambda a: a.update(gene=np.zeros((40, 2, 2, 2))), r"\[N, d\] or \[N, C, T\], got shape \(40, 2, 2, 2\)"),
    (lambda a: a.pop("labels"), "no 'labels' array"),
])
def test_bad_arrays_name_file_and_shape(tmp_path, change, message):
    a = _arrays()
    change(a)
    np.savez(tmp_path / "bad.npz", **a)
    with pytest.raises(ValueError, match=message) as e:
        load_multiview(tmp_path / "bad.npz")
    assert "bad.npz" in str(e.value)


def test_overlapping_and_out_of_range_split_files(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays())
    np.savez(tmp_path / "s.npz", train=np.arange(0, 30), val=np.arange(29, 34), test=np.arange(34, 40))
    with pytest.raises(ValueError, match=r"s.npz: splits 'train' and 'val' overlap \(1 rows, first row 29\)"):
        load_multiview(tmp_path / "d.npz", split_path=tmp_path / "s.npz")
    np.savez(tmp_path / "s.npz", train=np.arange(0, 30), test=np.arange(30, 41))
    with pytest.raises(ValueError, match=r"s.npz\['test'\]: entry 10 is row 40, outside \[0, 40\)"):
        load_multiview(tmp_path / "d.npz", split_path=tmp_path / "s.npz")
    np.save(tmp_path / "split.npy", np.array(["train"] * 39))
    with pytest.raises(ValueError, match=r"split.npy has 39 rows"):
        load_multiview(tmp_path / "d.npz", split_path=tmp_path / "split.npy")
    np.save(tmp_path / "split.npy", np.array(["train"] * 39 + ["dev"]))
    with pytest.raises(ValueError, match=r"row 39 has split 'dev'"):
        load_multiview(tmp_path / "d.npz", split_path=tmp_path / "split.npy")


def test_missing_path_and_too_few_class_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_multiview(tmp_path / "nope.npz")
    np.savez(tmp_path / "d.npz", **_arrays())
    with pytest.raises(ValueError, match="label 3 but only 3 class names"):
        load_multiview(tmp_path / "d.npz", class_names=["a", "b", "c"])
