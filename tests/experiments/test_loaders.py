"""Loaders for a user's data: open_clip CSV, Karpathy JSON, embedding .npy pairs; each bad input names its culprit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.data import load_dataset
from experiments.data.loaders import load_csv, load_embedding_pairs, load_karpathy

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture()
def images(tmp_path: Path) -> list[str]:
    """Three small PNGs of one flat colour each (40x20, so resizing and cropping are exercised)."""
    (tmp_path / "img").mkdir()
    names = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (40, 20), c).save(tmp_path / "img" / f"{i}.png")
        names.append(f"{i}.png")
    return names


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("filepath", "title"), sep="\t") -> Path:
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def test_csv_groups_captions_by_image_and_loads_images_lazily(tmp_path, images):
    rows = [("0.png", "a red card"), ("1.png", "a green card"), ("0.png", "red again"),
            ("2.png", "blue"), ("1.png", "green again")]
    data = load_csv(_write_csv(tmp_path / "train.tsv", rows), image_root=tmp_path / "img")
    assert len(data) == 3 and data.captions == [r[1] for r in rows]
    assert data.text_to_image.tolist() == [0, 1, 0, 2, 1]
    assert data.captions_of(0) == ["a red card", "red again"]
    assert data.image_paths[2] == str(tmp_path / "img" / "2.png")
    img = data.load_image(1, size=16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and tuple(img[8, 8]) == COLOURS[1]
    assert data.load_image(0).shape == (20, 40, 3)
    batches = list(data.iter_images(size=8, batch_size=2))
    assert [b.shape for b in batches] == [(2, 8, 8, 3), (1, 8, 8, 3)]
    assert data.load_images(size=8).shape == (3, 8, 8, 3)
    again = load_csv(tmp_path / "train.tsv", image_root=tmp_path / "img")
    assert again.fingerprint == data.fingerprint
    texts, t2i = data.flat_captions()
    assert texts == data.captions and np.array_equal(t2i, data.text_to_image)


def test_csv_custom_columns_and_separator(tmp_path, images):
    path = _write_csv(tmp_path / "d.csv", [(str(tmp_path / "img" / "2.png"), "blue")], header=("image", "caption"),
                      sep=",")
    data = load_csv(path, img_key="image", caption_key="caption", sep=",")
    assert data.captions == ["blue"] and data.load_image(0, 4)[0, 0].tolist() == list(COLOURS[2])


def test_csv_without_the_named_columns_lists_the_columns_found(tmp_path, images):
    path = _write_csv(tmp_path / "d.tsv", [("0.png", "red")], header=("path", "text"))
    with pytest.raises(ValueError, match=r"no column 'filepath' or 'title'; columns found: 'path', 'text'"):
        load_csv(path, image_root=tmp_path / "img")
    comma = _write_csv(tmp_path / "c.csv", [("0.png", "red")], sep=",")
    with pytest.raises(ValueError, match=r"columns found: 'filepath,title'"):  # wrong separator shows up too
        load_csv(comma, image_root=tmp_path / "img")


def test_csv_empty_caption_names_the_line(tmp_path, images):
    path = _write_csv(tmp_path / "d.tsv", [("0.png", "red"), ("1.png", "  ")])
    with pytest.raises(ValueError, match=r"d\.tsv, line 3: empty caption in column 'title'"):
        load_csv(path, image_root=tmp_path / "img")


def test_csv_missing_image_names_file_and_line(tmp_path, images):
    path = _write_csv(tmp_path / "d.tsv", [("0.png", "red"), ("missing.png", "gone")])
    with pytest.raises(FileNotFoundError, match=r"missing\.png not found \(named in .*d\.tsv, line 3\)"):
        load_csv(path, image_root=tmp_path / "img")
    lazy = load_csv(path, image_root=tmp_path / "img", check_files=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.png.*line 3"):
        lazy.load_image(1)


def test_corrupt_image_names_file_and_line(tmp_path, images):
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = load_csv(_write_csv(tmp_path / "d.tsv", [("0.png", "red"), ("bad.png", "broken")]),
                    image_root=tmp_path / "img")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png \(named in .*d\.tsv, line 3\)"):
        data.load_image(1, size=8)


def _karpathy(tmp_path: Path, images: list[str], **edits) -> Path:
    doc = {"dataset": "flickr8k", "images": [
        {"filename": images[0], "split": "train", "sentences": [{"raw": "red one"}, {"raw": "a red card"}]},
        {"filename": images[1], "filepath": ".", "split": "restval", "sentences": [{"raw": "green"}]},
        {"filename": images[2], "split": "test", "sentences": [{"raw": "blue", "tokens": ["blue"]}]},
    ]}
    for key, value in edits.items():
        i, field = key.split("__")
        doc["images"][int(i)][field] = value
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(doc))
    return path


def test_karpathy_splits_and_optional_filepath(tmp_path, images):
    path = _karpathy(tmp_path, images)
    test = load_karpathy(path, tmp_path / "img", split="test")
    assert test.captions == ["blue"] and test.image_paths == [str(tmp_path / "img" / "2.png")]
    train = load_karpathy(path, tmp_path / "img", split="train")  # restval counts as train
    assert train.captions == ["red one", "a red card", "green"] and train.text_to_image.tolist() == [0, 0, 1]
    assert train.load_image(1, 4)[0, 0].tolist() == list(COLOURS[1])
    assert len(load_karpathy(path, tmp_path / "img", split=None)) == 3
    with pytest.raises(ValueError, match="no image in split 'val'; splits found: restval, test, train"):
        load_karpathy(path, tmp_path / "img", split="val")


@pytest.mark.parametrize("edits, match", [
    ({"1__sentences": [{"tokens": ["green"]}]}, r"images\[1\]\.sentences\[0\] has no 'raw'"),
    ({"0__sentences": [{"raw": "ok"}, {"raw": " "}]}, r"images\[0\]\.sentences\[1\] has an empty 'raw'"),
    ({"2__sentences": []}, r"images\[2\] \(2\.png\) has no 'sentences'"),
    ({"2__filename": ""}, r"images\[2\] has no 'filename'"),
])
def test_karpathy_bad_entries_name_the_field(tmp_path, images, edits, match):
    with pytest.raises(ValueError, match=match):
        load_karpathy(_karpathy(tmp_path, images, **edits), tmp_path / "img", split=None)


def test_karpathy_bad_files(tmp_path, images):
    no_images = tmp_path / "a.json"
    no_images.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"a\.json: no 'images' list at the top level \(found: 'annotations'\)"):
        load_karpathy(no_images, tmp_path)
    broken = tmp_path / "b.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"b\.json is not valid JSON"):
        load_karpathy(broken, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"c\.json not found"):
        load_karpathy(tmp_path / "c.json", tmp_path)
    path = _karpathy(tmp_path, images)
    with pytest.raises(FileNotFoundError, match=r"2\.png not found \(named in .*images\[2\]\)"):
        load_karpathy(path, tmp_path / "elsewhere", split="test")


def _npy(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    np.save(tmp_path / name, arr)
    return tmp_path / name


def test_embedding_pairs_are_validated_float32_memory_maps(tmp_path):
    rng = np.random.default_rng(0)
    img = _npy(tmp_path, "img.npy", rng.normal(size=(4, 6)).astype(np.float32))
    txt = _npy(tmp_path, "txt.npy", rng.normal(size=(7, 5)))  # float64: converted
    t2i = _npy(tmp_path, "t2i.npy", np.array([0, 0, 1, 2, 3, 3, 3]))
    pairs = load_embedding_pairs(img, txt, t2i)
    assert isinstance(pairs.image_emb, np.memmap) and pairs.image_emb.dtype == np.float32
    assert pairs.text_emb.dtype == np.float32 and pairs.text_emb.shape == (7, 5)
    assert pairs.text_to_image.tolist() == [0, 0, 1, 2, 3, 3, 3]
    one_to_one = load_embedding_pairs(img, _npy(tmp_path, "t4.npy", np.ones((4, 3), np.float32)))
    assert one_to_one.text_to_image.tolist() == [0, 1, 2, 3]


def test_embedding_pair_errors_name_file_and_row(tmp_path):
    ok = np.ones((4, 3), np.float32)
    img = _npy(tmp_path, "img.npy", ok)
    nan = ok.copy()
    nan[2, 1] = np.nan
    cases = [
        (dict(text_npy=_npy(tmp_path, "t5.npy", np.ones((5, 3), np.float32))),
         r"t5\.npy has 5 rows but .*img\.npy has 4"),
        (dict(text_npy=_npy(tmp_path, "nan.npy", nan)), r"nan\.npy: row 2 contains NaN or Inf"),
        (dict(text_npy=_npy(tmp_path, "flat.npy", np.ones(4, np.float32))), r"flat\.npy: expected a 2-d array"),
        (dict(text_npy=_npy(tmp_path, "t6.npy", np.ones((6, 3), np.float32)),
              text_to_image_npy=_npy(tmp_path, "far.npy", np.array([0, 1, 2, 3, 9, 0]))),
         r"far\.npy: row 4 points to image 9, outside \[0, 4\)"),
        (dict(text_npy=_npy(tmp_path, "t3.npy", np.ones((3, 3), np.float32)),
              text_to_image_npy=_npy(tmp_path, "gap.npy", np.array([0, 1, 3]))),
         r"img\.npy: row 2 has no caption in .*gap\.npy"),
        (dict(text_npy=_npy(tmp_path, "t2.npy", np.ones((2, 3), np.float32)),
              text_to_image_npy=_npy(tmp_path, "short.npy", np.array([0, 1, 2, 3]))),
         r"short\.npy has 4 rows but .*t2\.npy has 2"),
        (dict(text_npy=tmp_path / "absent.npy"), r"absent\.npy not found"),
    ]
    for kw, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_embedding_pairs(img, **kw)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npy is not a readable \.npy array"):
        load_embedding_pairs(img, tmp_path / "junk.npy")


def test_load_dataset_dispatches_by_name(tmp_path, images):
    csv = _write_csv(tmp_path / "d.tsv", [("0.png", "red")])
    assert load_dataset("csv", path=csv, image_root=tmp_path / "img").captions == ["red"]
    assert len(load_dataset("karpathy", path=_karpathy(tmp_path, images), image_root=tmp_path / "img")) == 1
    assert len(load_dataset("digits", holdout_digits=[1]).splits["zeroshot"]) > 0
    assert len(load_dataset("shapesworld", n_scenes=5, image_size=32, use_cache=False)) == 5
    with pytest.raises(KeyError, match="unknown dataset 'mnist'; known datasets: basicmotions, csv, digits"):
        load_dataset("mnist")


# ------------------------------------------------------------------ issue 12: loaders never invent or merge data


def test_csv_stray_quote_does_not_merge_rows(tmp_path, images):
    """A caption opening with an unmatched quote used to swallow the next rows: two images became one."""
    path = tmp_path / "d.tsv"
    path.write_text('filepath\ttitle\n0.png\t"a red card\n1.png\tgreen\n2.png\tblue\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.tsv, line 2: a field runs on to line 4 \(an unmatched '\"' quote"):
        load_csv(path, image_root=tmp_path / "img")


def test_csv_blank_lines_and_closed_quotes_still_load(tmp_path, images):
    path = tmp_path / "d.tsv"
    path.write_text('filepath\ttitle\n0.png\t"a ""red"" card"\n\n1.png\tgreen\n', encoding="utf-8")
    assert load_csv(path, image_root=tmp_path / "img").captions == ['a "red" card', "green"]


def test_csv_non_utf8_names_file_and_line(tmp_path, images):
    path = tmp_path / "d.tsv"
    path.write_bytes(b"filepath\ttitle\n0.png\tred\n1.png\tgr\xe9en\n")
    with pytest.raises(ValueError, match=r"d\.tsv: line 3, byte 9 of the line: not UTF-8 \(0xe9\)"):
        load_csv(path, image_root=tmp_path / "img")


def test_csv_oversized_field_names_file_and_line(tmp_path, images):
    path = tmp_path / "d.tsv"
    path.write_text("filepath\ttitle\n0.png\tred\n1.png\t" + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.tsv, line 3: field larger than field limit"):
        load_csv(path, image_root=tmp_path / "img")


def test_csv_extra_fields_name_the_line(tmp_path, images):
    path = _write_csv(tmp_path / "d.tsv", [("0.png", "red"), ("1.png", "green\tand more")])
    with pytest.raises(ValueError, match=r"d\.tsv, line 3: 3 fields but the header has 2"):
        load_csv(path, image_root=tmp_path / "img")


@pytest.mark.parametrize("raw", [None, 7, ["a"]])
def test_karpathy_raw_that_is_not_text_is_an_error_not_a_caption(tmp_path, images, raw):
    """`raw: null` used to become the caption "None"."""
    path = _karpathy(tmp_path, images, **{"1__sentences": [{"raw": raw}]})
    with pytest.raises(ValueError, match=r"images\[1\]\.sentences\[0\] \(1\.png\): 'raw' is .*, not a caption string"):
        load_karpathy(path, tmp_path / "img", split=None)


def test_karpathy_non_utf8_names_file_and_line(tmp_path, images):
    path = tmp_path / "k.json"
    path.write_bytes(b'{"images": [\n{"filename": "0.png", "split": "test",\n "sentences": [{"raw": "r\xffd"}]}]}')
    with pytest.raises(ValueError, match=r"k\.json: line 3, byte 26 of the line: not UTF-8 \(0xff\)"):
        load_karpathy(path, tmp_path / "img")
