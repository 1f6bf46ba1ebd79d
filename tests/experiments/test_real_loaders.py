"""Parsers and loaders of the real data sets, on tiny fixtures built here (the real data: test_real_data.py)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.data import DATASETS, MultiViewData, load_dataset
from experiments.data.real import (
    load_basicmotions,
    load_fashion_mnist,
    load_mfeat,
    load_nutrimouse,
    load_tuxpaint,
    loo_score,
    rcca_reference,
    read_idx,
    read_ts,
)
from experiments.data.real import tuxpaint as tux
from tests.experiments.test_fetch import TS_HEADER, fashion_files, ts_text


def test_all_five_are_registered():
    assert {"tuxpaint", "fashion_mnist", "mfeat", "nutrimouse", "basicmotions"} <= set(DATASETS)


# ------------------------------------------------------------------------------------------------ .ts


def test_read_ts(tmp_path):
    path = tmp_path / "a.ts"
    path.write_text(ts_text(2, 0, length=7))
    x, y, names = read_ts(path)
    assert x.shape == (8, 6, 7) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert names == ["Standing", "Running", "Walking", "Badminton"]


@pytest.mark.parametrize("row, match", [
    ("1,2:3,4:Jumping", r"a\.ts, line 10: label 'Jumping' is not one of Standing"),
    ("1,2:3,x:Running", r"a\.ts, line 10: could not convert string to float"),
    ("1,2:3,4,5:Running", r"a\.ts, line 10: dimensions of unequal lengths \[2, 3\]"),
])
def test_read_ts_errors_name_file_and_line(tmp_path, row, match):
    path = tmp_path / "a.ts"
    path.write_text(TS_HEADER + row + "\n")
    with pytest.raises(ValueError, match=match):
        read_ts(path)


def test_basicmotions_two_sensors_and_the_standard_split(tmp_path):
    (tmp_path / "BasicMotions_TRAIN.ts").write_text(ts_text(5, 0))
    (tmp_path / "BasicMotions_TEST.ts").write_text(ts_text(5, 1))
    data = load_dataset("basicmotions", path=tmp_path)
    assert isinstance(data, MultiViewData) and data.modalities == ["accelerometer", "gyroscope"]
    assert data.views["accelerometer"].shape == (40, 3, 5) and data.views["gyroscope"].dtype == np.float32
    x, _, _ = read_ts(tmp_path / "BasicMotions_TEST.ts")
    np.testing.assert_allclose(data.views["gyroscope"][20:], x[:, 3:], rtol=1e-6)
    assert data.splits["test"].tolist() == list(range(20, 40))
    assert sorted([*data.splits["train"], *data.splits["val"]]) == list(range(20))
    assert np.bincount(data.labels[data.splits["val"]]).tolist() == [1, 1, 1, 1]
    (tmp_path / "BasicMotions_TEST.ts").unlink()
    with pytest.raises(FileNotFoundError, match=r"BasicMotions_TEST\.ts not found"):
        load_basicmotions(path=tmp_path)


# ------------------------------------------------------------------------------------------------ idx


def test_fashion_mnist_zero_shot_splits(tmp_path):
    fashion_files(tmp_path, per_class=(10, 3))
    data = load_fashion_mnist(path=tmp_path)
    assert data.unseen == (2, 9) and data.seen == (0, 1, 3, 4, 5, 6, 7, 8)
    assert not np.isin(data.labels[np.concatenate([data.splits["train"], data.splits["val"]])], data.unseen).any()
    assert sorted(np.unique(data.labels[data.splits["zeroshot"]])) == [2, 9]
    assert sorted([*data.splits["test"], *data.splits["zeroshot"]]) == list(range(100, 130))
    assert data.captions[data.splits["zeroshot"][-1]] == ["a photo of an ankle boot"]
    assert data.images_rgb(np.array([0, 1]), size=32).shape == (2, 32, 32, 3)
    small = load_fashion_mnist(path=tmp_path, train_per_class=4, test_per_class=1, unseen=["Bag"])
    assert len(small.splits["train"]) + len(small.splits["val"]) == 36 and len(small.splits["zeroshot"]) == 1
    with pytest.raises(ValueError, match="unknown Fashion-MNIST class"):
        load_fashion_mnist(path=tmp_path, unseen=["Hat"])


def test_idx_errors_name_the_file(tmp_path):
    fashion_files(tmp_path)
    good = tmp_path / "t10k-labels-idx1-ubyte.gz"
    assert read_idx(good).tolist() == np.repeat(np.arange(10), 2).tolist()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"cannot read .*cut\.gz \(damaged or truncated\?\)"):
        read_idx(cut)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match=r"short\.gz: header says shape \(5,\) \(13 bytes\) but the file holds 10"):
        read_idx(short)


# ------------------------------------------------------------------------------------------------ mfeat


def test_mfeat_both_layouts(tmp_path):
    from experiments.data.real.mfeat import VIEWS

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 200)
    csv_dir, uci_dir = tmp_path / "csv", tmp_path / "uci"
    csv_dir.mkdir()
    uci_dir.mkdir()
    for code, d in VIEWS.items():
        x = rng.normal(size=(2000, d)).round(3)
        np.savetxt(csv_dir / f"mfeat-{code}.csv", np.column_stack([x, labels]), delimiter=",", fmt="%g",
                   header=",".join(str(i) for i in range(d + 1)), comments="")
        np.savetxt(uci_dir / f"mfeat-{code}", x, fmt="%g")
    a = load_mfeat(path=csv_dir)
    b = load_mfeat(path=uci_dir, views=["fou", "mor"])
    assert [v.shape[1] for v in a.views.values()] == list(VIEWS.values()) and b.modalities == ["fou", "mor"]
    np.testing.assert_allclose(a.views["mor"], b.views["mor"])
    assert np.array_equal(a.labels, labels) and np.array_equal(a.labels, b.labels)
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 1400, "val": 200, "test": 400}
    np.savetxt(uci_dir / "mfeat-kar", rng.normal(size=(1999, 64)))
    with pytest.raises(ValueError, match=r"mfeat-kar: expected 2000 rows x 64 features for view 'kar', got \(1999"):
        load_mfeat(path=uci_dir)
    with pytest.raises(ValueError, match="unknown mfeat view"):
        load_mfeat(path=uci_dir, views=["abc"])


# ------------------------------------------------------------------------------------------------ nutrimouse


def _nutrimouse(folder: Path, n: int = 12, p: int = 15, q: int = 4) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, 2))
    gene = z @ rng.normal(size=(2, p)) + 0.3 * rng.normal(size=(n, p))
    lipid = z @ rng.normal(size=(2, q)) + 0.3 * rng.normal(size=(n, q))
    folder.mkdir(parents=True, exist_ok=True)
    for name, x in (("gene", gene), ("lipid", lipid)):
        header = ",".join(f'"{name}{j}"' for j in range(x.shape[1]))
        np.savetxt(folder / f"{name}.csv", x, delimiter=",", header=header, comments="", fmt="%.6f")
    (folder / "genotype.csv").write_text('"genotype"\n' + "\n".join(['"wt"', '"ppar"'] * (n // 2)) + "\n")
    (folder / "diet.csv").write_text('"diet"\n' + "\n".join(['"lin"', '"sun"', '"fish"'] * (n // 3)) + "\n")


def test_nutrimouse_loader_and_the_closed_form_reference(tmp_path):
    from align.cca import CCA

    _nutrimouse(tmp_path)
    data = load_nutrimouse(path=tmp_path)
    assert data.views["gene"].shape == (12, 15) and data.class_names == ["ppar", "wt"]
    assert load_nutrimouse(path=tmp_path, label="diet").class_names == ["fish", "lin", "sun"]
    x = np.loadtxt(tmp_path / "gene.csv", delimiter=",", skiprows=1)
    y = np.loadtxt(tmp_path / "lipid.csv", delimiter=",", skiprows=1)
    ref = rcca_reference(x, y, 0.05, 0.1)
    xc = x - x.mean(0)
    cxx = xc.T @ xc / 11 + 0.05 * np.eye(15)
    np.testing.assert_allclose(ref.xcoef.T @ cxx @ ref.xcoef, np.eye(4), atol=1e-9)  # R's normalisation
    assert np.all(np.diff(ref.cor) <= 1e-12) and 0 < ref.cor[-1] <= ref.cor[0] < 1
    cca = CCA(n_components=4, reg_x=0.05, reg_y=0.1, reg_mode="absolute").fit(x, y)
    np.testing.assert_allclose(cca.correlations_, ref.variate_cor, atol=1e-8)
    aligned, raw = loo_score(x, y, 0.05, 0.1), loo_score(x, y, 0.05, 0.1, align_signs=False)
    assert -1 <= raw <= 1 and 0.3 < aligned <= 1
    (tmp_path / "lipid.csv").write_text('"a","b"\n1,2\n3\n')
    with pytest.raises(ValueError, match=r"lipid\.csv, line 3: 1 fields but the header has 2"):
        load_nutrimouse(path=tmp_path)


# ------------------------------------------------------------------------------------------------ tuxpaint


def _stamp(folder: Path, name: str, caption: str | None, colour=(200, 30, 30), size=(30, 20)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", size, (0, 0, 0, 0))  # transparent background, a coloured box in the middle
    im.paste(Image.new("RGBA", (size[0] // 2, size[1] // 2), (*colour, 255)), (size[0] // 4, size[1] // 4))
    im.save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n", encoding="utf-8")


@pytest.fixture()
def stamps(tmp_path: Path) -> Path:
    root = tmp_path / "stamps"
    for i in range(5):
        _stamp(root / "animals" / "mammals", f"a{i}", f"An animal {i}.")
        _stamp(root / "food" / "fruit", f"f{i}", f"A fruit {i}.", colour=(30, 200, 30))
    _stamp(root / "food" / "fruit", "f0_mirror", None)  # Tux Paint's pre-mirrored variant: not a stamp
    _stamp(root / "symbols" / "letters", "x", "The letter X.")  # dropped
    (root / "seasonal").mkdir()
    (root / "seasonal" / "gift.txt").write_text("A gift.\n")  # a caption without an image: skipped
    return root


def test_tuxpaint_stamps_on_white_with_captions_labels_and_a_split(tmp_path, stamps):
    data = load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache", val_fraction=0.2, test_fraction=0.4)
    assert len(data) == 10 and data.class_names == ["animals", "food"]
    assert data.captions[0] == "An animal 0." and data.stamps[0] == "animals/mammals/a0.png"
    assert data.labels.tolist() == [0] * 5 + [1] * 5
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 4, "val": 2, "test": 4}
    img = data.load_image(0)
    assert img.shape == (32, 32, 3) and tuple(img[0, 0]) == (255, 255, 255)  # transparent -> white
    assert tuple(img[16, 16]) == (200, 30, 30) and tuple(data.load_image(7)[16, 16]) == (30, 200, 30)
    test = data.subset("test")
    assert len(test) == 4 and test.captions == [data.captions[i] for i in data.splits["test"]]
    again = load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache", val_fraction=0.2, test_fraction=0.4)
    assert again.image_paths == data.image_paths and again.fingerprint == data.fingerprint


def test_tuxpaint_svg_skipped_without_a_renderer(tmp_path, stamps, monkeypatch, caplog):
    (stamps / "food" / "fruit" / "pear.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" '
                                                        'height="10"><rect width="10" height="10"/></svg>')
    (stamps / "food" / "fruit" / "pear.txt").write_text("A pear.\n")
    monkeypatch.setattr(tux, "find_rsvg", lambda root=None: None)
    data = load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache")
    assert len(data) == 10 and "skipping 1 SVG-only stamps" in caplog.text


@pytest.mark.skipif(tux.find_rsvg() is None, reason="no rsvg-convert (alignfuse fetch tuxpaint brings one)")
def test_tuxpaint_svg_rendered(tmp_path, stamps):
    (stamps / "food" / "fruit" / "pear.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" '
                                                        'height="10"><rect width="10" height="10" fill="#0000ff"/></svg>')
    (stamps / "food" / "fruit" / "pear.txt").write_text("A pear.\n")
    data = load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache")
    i = data.captions.index("A pear.")
    assert tuple(data.load_image(i)[16, 16]) == (0, 0, 255)


def test_tuxpaint_bad_stamps_name_the_file(tmp_path, stamps):
    _stamp(stamps / "animals" / "birds", "owl", None)
    with pytest.raises(FileNotFoundError, match=r"stamp .*birds/owl\.png has no caption file .*owl\.txt"):
        load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache")
    (stamps / "animals" / "birds" / "owl.txt").write_text("An owl.\n")
    (stamps / "animals" / "birds" / "owl.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"cannot read stamp image .*birds/owl\.png"):
        load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache")
    (stamps / "animals" / "birds" / "owl.png").unlink()
    _stamp(stamps / "animals" / "birds", "owl", "")
    with pytest.raises(ValueError, match=r"owl\.txt, line 1: empty caption"):
        load_tuxpaint(path=stamps, size=32, cache_dir=tmp_path / "cache")
