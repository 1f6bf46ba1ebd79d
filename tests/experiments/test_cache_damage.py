"""Caches detect damage: a 0-byte, truncated, same-size garbage or swapped file is rebuilt with a warning (never
used silently, never a crash), and temporaries of killed writers are removed on the next open or write."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import experiments.data.shapesworld as sw
from experiments.data.shapesworld import generate_shapesworld, load_shapesworld
from experiments.features import FeatureCache


def _garble_same_size(path) -> None:
    """Overwrite the bytes after a .npy header with other bytes of the same length."""
    data = bytearray(path.read_bytes())
    start = 128 if path.suffix == ".npy" else 0
    rng = np.random.default_rng(0)
    data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ feature cache


def _entry(cache: FeatureCache, split: str, rows: int = 6, value: float = 0.0):
    feats = {"pooled": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + value,
             "grid": np.full((rows, 2, 3), value, np.float16)}
    cache.save("enc", "fp", split, feats)
    return {k: np.array(v) for k, v in feats.items()}


def _recomputed(cache: FeatureCache, split: str, expected: dict, caplog) -> None:
    calls = []

    def compute():
        calls.append(1)
        return expected

    with caplog.at_level(logging.WARNING, logger="experiments.feature_cache"):
        out = cache.get_or_compute("enc", "fp", split, compute, kinds=["pooled", "grid"])
    assert calls == [1], "a damaged entry was used instead of recomputed"
    assert "damaged" in caplog.text
    for k, v in expected.items():
        np.testing.assert_array_equal(out[k], v)
    # and now the entry is whole again: a hit
    assert cache.get_or_compute("enc", "fp", split, lambda: pytest.fail("recomputed a good entry"),
                                kinds=["pooled", "grid"]) is not None


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "same_size_garbage"])
def test_feature_cache_rebuilds_a_damaged_file(tmp_path, caplog, damage):
    cache = FeatureCache(tmp_path)
    expected = _entry(cache, "train")
    path = cache.entry_dir("enc", "fp", "train") / "pooled.npy"
    if damage == "zero_bytes":
        path.write_bytes(b"")  # was: EOFError
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    else:
        _garble_same_size(path)  # was: used silently
    _recomputed(cache, "train", expected, caplog)
    assert "pooled.npy" in caplog.text


def test_feature_cache_rebuilds_swapped_split_files(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    train, test = _entry(cache, "train", value=0.0), _entry(cache, "test", value=100.0)
    a, b = (cache.entry_dir("enc", "fp", s) / "pooled.npy" for s in ("train", "test"))
    tmp = a.with_name("x")
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)  # same shapes and sizes, other split's rows
    _recomputed(cache, "train", train, caplog)
    _recomputed(cache, "test", test, caplog)


def test_feature_cache_rebuilds_a_sidecar_of_another_entry(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    train = _entry(cache, "train")
    _entry(cache, "val", value=5.0)
    d_train, d_val = (cache.entry_dir("enc", "fp", s) for s in ("train", "val"))
    (d_train / "meta.json").write_bytes((d_val / "meta.json").read_bytes())
    _recomputed(cache, "train", train, caplog)
    assert "another entry" in caplog.text


def test_feature_cache_entries_of_the_previous_format_are_recomputed(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    expected = _entry(cache, "train")
    meta_path = cache.entry_dir("enc", "fp", "train") / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 1
    for entry in meta["kinds"].values():
        del entry["size"], entry["sha256"]
    meta_path.write_text(json.dumps(meta))
    _recomputed(cache, "train", expected, caplog)


_KILLED_CACHE_WRITER = """
import os, sys
import numpy as np
import experiments.features as F
from experiments.features import FeatureCache
real = np.save
def dying_save(f, arr, **kw):
    f.write(b"partial")
    f.flush()
    os._exit(9)
np.save = dying_save
FeatureCache(sys.argv[1]).save("enc", "fp", "train", {"pooled": np.zeros((3, 2), np.float32)})
"""


def test_feature_cache_removes_temporaries_of_a_killed_writer(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", _KILLED_CACHE_WRITER, str(tmp_path)], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    cache = FeatureCache(tmp_path)
    directory = cache.entry_dir("enc", "fp", "train")
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]  # the killed writer's leftover
    with caplog.at_level(logging.WARNING, logger="align.weights"):
        assert cache.load("enc", "fp", "train") is None
    assert list(directory.iterdir()) == []
    assert "killed writer" in caplog.text


# ----------------------------------------------------------------------------------------- dataset cache

KW = dict(n_scenes=24, image_size=32, seed=2)


@pytest.fixture(scope="module")
def fresh():
    return generate_shapesworld(sw.ShapesWorldConfig(**KW))


def _regenerated(tmp_path, fresh, caplog, damaged: str) -> None:
    calls = []
    real = sw.generate_shapesworld

    def counting(config):
        calls.append(1)
        return real(config)

    sw.generate_shapesworld = counting
    try:
        with caplog.at_level(logging.WARNING, logger="experiments.data.shapesworld"):
            again = load_shapesworld(cache_dir=tmp_path, **KW)
    finally:
        sw.generate_shapesworld = real
    assert calls == [1], "a damaged dataset cache was used instead of regenerated"
    assert "damaged" in caplog.text and damaged in caplog.text
    assert again.images.tobytes() == fresh.images.tobytes() and again.depth.tobytes() == fresh.depth.tobytes()
    assert all(np.array_equal(again.splits[k], fresh.splits[k]) for k in fresh.splits)
    assert all(np.array_equal(again.labels[k], fresh.labels[k]) for k in fresh.labels)
    assert again.captions == fresh.captions
    assert [p.name for p in tmp_path.iterdir()] == [again.cache_path.name]  # no leftovers


@pytest.mark.parametrize("damage, file", [("zero_bytes", "images.npy"), ("zero_bytes", "splits/train.npy"),
                                          ("same_size_garbage", "depth.npy"), ("same_size_garbage", "text.json"),
                                          ("truncated", "labels/largest_shape.npy")])
def test_dataset_cache_rebuilds_a_damaged_file(tmp_path, caplog, fresh, damage, file):
    first = load_shapesworld(cache_dir=tmp_path, **KW)
    path = first.cache_path / file
    del first
    if damage == "zero_bytes":
        path.write_bytes(b"")  # was: EOFError
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    else:
        _garble_same_size(path)  # was: used silently
    _regenerated(tmp_path, fresh, caplog, file)


def test_dataset_cache_rebuilds_swapped_split_files(tmp_path, caplog, fresh):
    first = load_shapesworld(cache_dir=tmp_path, **KW)
    a, b = first.cache_path / "splits" / "val.npy", first.cache_path / "splits" / "test.npy"
    tmp = a.with_name("x")
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)  # was: val and test silently exchanged
    _regenerated(tmp_path, fresh, caplog, "splits/")


_KILLED_DATASET_WRITER = """
import os, sys
import experiments.data.shapesworld as sw
real = sw.dataset.save_json  # ShapesWorld.save writes through it
def dying(path, obj):
    if path.name == "scenes.json":
        os._exit(9)
    real(path, obj)
sw.dataset.save_json = dying
sw.load_shapesworld(cache_dir=sys.argv[1], n_scenes=24, image_size=32, seed=2)
"""


def test_dataset_cache_removes_the_temporary_directory_of_a_killed_writer(tmp_path, caplog, fresh):
    proc = subprocess.run([sys.executable, "-c", _KILLED_DATASET_WRITER, str(tmp_path)], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and ".tmp-" in left[0]
    with caplog.at_level(logging.WARNING, logger="align.weights"):
        again = load_shapesworld(cache_dir=tmp_path, **KW)
    assert [p.name for p in tmp_path.iterdir()] == [again.cache_path.name]
    assert "killed writer" in caplog.text
    assert again.images.tobytes() == fresh.images.tobytes()


@pytest.mark.parametrize("damage", ["one_block_overwritten", "swapped_with_same_size_file", "same_size_garbage"])
def test_large_files_are_checked_by_a_sampled_hash(tmp_path, monkeypatch, caplog, damage):
    """Above FULL_HASH_MAX_BYTES the content check reads 64 blocks of 64 KiB instead of the whole file."""
    import experiments.data._common as common

    monkeypatch.setattr(common, "FULL_HASH_MAX_BYTES", 1 << 20)
    cache = FeatureCache(tmp_path)
    rows = 4096  # 4096 x 512 float32 = 8 MiB per file
    feats = {"pooled": np.random.default_rng(0).normal(size=(rows, 512)).astype(np.float32)}
    cache.save("enc", "fp", "train", feats)
    cache.save("enc", "fp", "test", {"pooled": feats["pooled"][::-1].copy()})
    common._verified.clear()  # as in a new process
    path = cache.entry_dir("enc", "fp", "train") / "pooled.npy"
    if damage == "one_block_overwritten":
        with open(path, "r+b") as f:  # the first block is always sampled (it also holds the header's row count)
            f.seek(200)
            f.write(b"\x00" * 1000)
    elif damage == "swapped_with_same_size_file":
        os.replace(cache.entry_dir("enc", "fp", "test") / "pooled.npy", path)
    else:
        _garble_same_size(path)
    reads = []
    real_sha = common.sha256_file
    monkeypatch.setattr(common, "sha256_file", lambda p: reads.append(p) or real_sha(p))
    with caplog.at_level(logging.WARNING, logger="experiments.feature_cache"):
        assert cache.load("enc", "fp", "train") is None
    assert "sampled sha256 mismatch" in caplog.text and reads == []  # never read the whole file
