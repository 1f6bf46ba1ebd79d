"""Fetchers on tiny packages built in the test (a .deb with dpkg-deb --build, a wheel with zipfile): no network."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from experiments.data import fetch as fetch_mod
from experiments.data.fetch import FetchError, fetch, find_data, read_manifest, unpack
from experiments.data.real import load_basicmotions, load_fashion_mnist

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def _idx(path: Path, arr: np.ndarray) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def fashion_files(folder: Path, per_class=(3, 2), seed: int = 0) -> None:
    """The four Fashion-MNIST IDX files, ``per_class`` train / test photos of each class (random pixels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, k in (("train", per_class[0]), ("t10k", per_class[1])):
        labels = np.repeat(np.arange(10, dtype=np.uint8), k)
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8))
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture()
def tiny_deb(tmp_path: Path) -> Path:
    """A Debian package laid out like dataset-fashion-mnist, built with dpkg-deb --build."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0~test-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: tiny test package\n")
    fashion_files(root / "usr/share/datasets/fashion-mnist")
    (root / "usr/share/datasets/fashion-mnist/README.md").write_text("not data")
    (root / "usr/share/doc/dataset-fashion-mnist").mkdir(parents=True)
    (root / "usr/share/doc/dataset-fashion-mnist/copyright").write_text("License: MIT\n")
    deb = tmp_path / "dataset-fashion-mnist_0.0~test-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


TS_HEADER = ("#tiny\n@problemName BasicMotions\n@timeStamps false\n@univariate false\n@dimensions 6\n"
             "@equalLength true\n@seriesLength 5\n@classLabel true Standing Running Walking Badminton\n@data\n")


def ts_text(n_per_class: int, seed: int, length: int = 5) -> str:
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("Standing", "Running", "Walking", "Badminton"):
        for _ in range(n_per_class):
            dims = [",".join(f"{v:.4f}" for v in rng.normal(size=length)) for _ in range(6)]
            rows.append(":".join(dims) + f":{label}")
    return TS_HEADER + "\n".join(rows) + "\n"


@pytest.fixture()
def tiny_wheel(tmp_path: Path) -> Path:
    """A wheel laid out like sktime's, with a tiny BasicMotions train and test file."""
    whl = tmp_path / "sktime-1.2.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("sktime/__init__.py", "")
        zf.writestr("sktime/datasets/data/BasicMotions/BasicMotions_TRAIN.ts", ts_text(3, 0))
        zf.writestr("sktime/datasets/data/BasicMotions/BasicMotions_TEST.ts", ts_text(2, 1))
        zf.writestr("sktime/datasets/data/Other/Other_TRAIN.ts", "not ours")
        zf.writestr("sktime-1.2.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: sktime\nVersion: 1.2.0\n"
                                                       "License: BSD 3-Clause License\n\nlong description\n")
        zf.writestr("sktime-1.2.0.dist-info/LICENSE", "BSD 3-Clause\n")
    return whl


def serve(package: Path, calls: list[str] | None = None):
    """A downloader that copies ``package`` into the temporary folder (and counts calls); any other package (a
    tool such as librsvg2-bin) is not found."""
    def download(source, tmp: Path) -> Path:
        if source.package not in package.name:
            raise FetchError(f"{source.package}: not served in this test")
        if calls is not None:
            calls.append(source.package)
        return Path(shutil.copy(package, tmp / package.name))
    return download


@needs_dpkg
def test_deb_fetch_keeps_only_data_files_with_a_manifest_and_is_idempotent(tmp_path, tiny_deb):
    calls: list[str] = []
    cache = tmp_path / "cache"
    where = fetch("fashion_mnist", cache_dir=cache, downloader=serve(tiny_deb, calls))
    assert where == cache / "fashion_mnist" and calls == ["dataset-fashion-mnist"]
    m = read_manifest("fashion_mnist", cache)
    assert m["package"] == "dataset-fashion-mnist" and m["version"] == "0.0~test-1" and m["licence"] == "MIT"
    assert sorted(m["files"]) == sorted(f"{p}-{k}-ubyte.gz" for p in ("train", "t10k")
                                        for k in ("images-idx3", "labels-idx1"))
    assert not (where / "README.md").exists() and (where / "LICENCE-dataset-fashion-mnist-copyright").is_file()
    digest = m["files"]["t10k-labels-idx1-ubyte.gz"]["sha256"]
    assert digest == fetch_mod.sha256_file(where / "t10k-labels-idx1-ubyte.gz")
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert fetch("fashion_mnist", cache_dir=cache, downloader=serve(tiny_deb, calls)) == where
    assert calls == ["dataset-fashion-mnist"]  # second call: nothing downloaded
    data = load_fashion_mnist(path=where)
    assert data.images.shape == (50, 28, 28) and len(data.splits["zeroshot"]) == 4
    assert find_data("fashion_mnist", None, cache) == where


@needs_dpkg
def test_damaged_fetch_is_fetched_again(tmp_path, tiny_deb, caplog):
    calls: list[str] = []
    cache = tmp_path / "cache"
    where = fetch("fashion_mnist", cache_dir=cache, downloader=serve(tiny_deb, calls))
    (where / "train-labels-idx1-ubyte.gz").write_bytes(b"short")
    assert read_manifest("fashion_mnist", cache) is None
    fetch("fashion_mnist", cache_dir=cache, downloader=serve(tiny_deb, calls))
    assert len(calls) == 2 and "damaged" in caplog.text and read_manifest("fashion_mnist", cache) is not None


@needs_dpkg
def test_truncated_deb_names_the_file(tmp_path, tiny_deb):
    cut = tmp_path / "dataset-fashion-mnist_cut.deb"
    cut.write_bytes(tiny_deb.read_bytes()[: tiny_deb.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot unpack .*dataset-fashion-mnist_cut\.deb"):
        fetch("fashion_mnist", cache_dir=tmp_path / "cache", downloader=serve(cut))
    assert not (tmp_path / "cache" / "fashion_mnist").exists()


def test_wheel_fetch_records_version_licence_and_loads(tmp_path, tiny_wheel):
    cache = tmp_path / "cache"
    where = fetch("basicmotions", cache_dir=cache, downloader=serve(tiny_wheel))
    m = json.loads((where / "manifest.json").read_text())
    assert (m["package"], m["version"], m["licence"]) == ("sktime", "1.2.0", "BSD 3-Clause License")
    assert sorted(m["files"]) == ["BasicMotions_TEST.ts", "BasicMotions_TRAIN.ts"]
    assert m["licence_files"] == ["LICENCE-sktime-LICENSE"] and m["package_file"] == tiny_wheel.name
    data = load_basicmotions(path=where)
    assert data.views["gyroscope"].shape == (20, 3, 5) and len(data.splits["test"]) == 8


def test_truncated_wheel_names_the_file(tmp_path, tiny_wheel):
    cut = tmp_path / "sktime-cut.whl"
    cut.write_bytes(tiny_wheel.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot unpack .*sktime-cut\.whl"):
        unpack(cut, tmp_path / "out")
    with pytest.raises(ValueError, match=r"sktime-cut\.whl"):
        fetch("basicmotions", cache_dir=tmp_path / "cache", downloader=serve(cut))


def test_a_package_without_the_data_folder_is_an_error(tmp_path):
    whl = tmp_path / "sktime-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("sktime/__init__.py", "")
    with pytest.raises(ValueError, match=r"sktime-0\.1-py3-none-any\.whl: no folder sktime/datasets/data/BasicMotions"):
        fetch("basicmotions", cache_dir=tmp_path / "cache", downloader=serve(whl))


def test_without_a_package_manager_the_error_says_what_to_get_and_which_path_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match=r"no apt-get on this machine .*tuxpaint-stamps.*data\.path="):
        fetch("tuxpaint", cache_dir=tmp_path)
    monkeypatch.setattr(fetch_mod.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(FetchError, match=r"timeseriesclassification\.com.*data\.path=<folder holding BasicMotions"):
        fetch("basicmotions", cache_dir=tmp_path)


def test_unknown_name_and_missing_user_path(tmp_path):
    with pytest.raises(KeyError, match="unknown data set 'mnist' to fetch; known: basicmotions, fashion_mnist"):
        fetch("mnist", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mfeat: data\.path=.*nowhere does not exist"):
        find_data("mfeat", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"mfeat has not been fetched: run `alignfuse fetch mfeat`"):
        find_data("mfeat", None, tmp_path, fetch_missing=False)


def test_cli_lists_and_fetches(tmp_path, tiny_wheel, monkeypatch, capsys):
    from experiments.cli import main

    real = fetch_mod.fetch
    monkeypatch.setattr(fetch_mod, "fetch", lambda name, cache_dir=None, force=False:
                        real(name, cache_dir=cache_dir, force=force, downloader=serve(tiny_wheel)))
    assert main(["fetch", "basicmotions", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "basicmotions: sktime 1.2.0 (BSD 3-Clause License), 2 files" in out and str(tmp_path) in out
    assert main(["fetch", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "basicmotions   pip sktime" in listing and "fetched: sktime 1.2.0" in listing
    assert "tuxpaint       apt tuxpaint-stamps-default" in listing and "not fetched" in listing
