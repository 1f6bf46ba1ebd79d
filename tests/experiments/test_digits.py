"""scikit-learn digits: arrays, views, captions, stratified seeded splits, held-out digits, bad config."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from experiments.data.digits import DIGIT_NAMES, DigitsData, load_digits


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_digits()


def test_arrays_match_sklearn_and_views_are_the_two_halves(digits):
    raw = sk_load_digits()
    n = len(raw.target)
    assert digits.images.shape == (n, 8, 8) and digits.images.dtype == np.float32
    np.testing.assert_allclose(digits.images * 16, raw.images, atol=1e-5)
    assert np.array_equal(digits.labels["digit"], raw.target)
    assert digits.images_rgb.shape == (n, 32, 32, 3) and digits.images_rgb.dtype == np.uint8
    assert np.array_equal(digits.images_rgb[..., 0], digits.images_rgb[..., 2])
    left, right = digits.views["left"], digits.views["right"]
    assert left.shape == right.shape == (n, 32)
    rebuilt = np.concatenate([left.reshape(n, 8, 4), right.reshape(n, 8, 4)], axis=2)
    assert np.array_equal(rebuilt, digits.images)
    assert load_digits(image_size=48).images_rgb.shape == (n, 48, 48, 3)


def test_captions_name_the_digit(digits):
    assert digits.class_names["digit"] == list(DIGIT_NAMES)
    for caps, d in zip(digits.captions, digits.labels["digit"]):
        assert len(caps) >= 5 and len(set(caps)) == len(caps)
        assert all(DIGIT_NAMES[d] in c or str(d) in c.split() for c in caps)
    texts, t2i = digits.flat_captions("test")
    idx = digits.splits["test"]
    assert len(texts) == 5 * len(idx) and t2i.max() == len(idx) - 1
    assert all(t in digits.captions[idx[j]] for t, j in zip(texts, t2i))


def test_splits_are_stratified_disjoint_covering_and_seeded(digits):
    sp = digits.splits
    n = len(digits)
    assert np.array_equal(np.sort(np.concatenate(list(sp.values()))), np.arange(n))
    assert len(sp["zeroshot"]) == 0 and abs(len(sp["train"]) / n - 0.8) < 0.01
    for name in ("train", "val", "test"):  # every digit appears in proportion
        counts = np.bincount(digits.labels["digit"][sp[name]], minlength=10)
        assert counts.min() > 0.7 * counts.mean()
    again, other = load_digits(), load_digits(seed=1)
    assert all(np.array_equal(sp[k], again.splits[k]) for k in sp)
    assert not np.array_equal(sp["train"], other.splits["train"])
    assert again.fingerprint == digits.fingerprint != other.fingerprint


def test_held_out_digits_only_in_zeroshot():
    data = load_digits(holdout_digits=[3, 7])
    lab = data.labels["digit"]
    assert set(lab[data.splits["zeroshot"]]) == {3, 7}
    assert np.array_equal(data.splits["zeroshot"], np.flatnonzero(np.isin(lab, [3, 7])))
    for name in ("train", "val", "test"):
        assert not np.isin(lab[data.splits[name]], [3, 7]).any()
    sub = data.subset("zeroshot")
    assert len(sub) == len(data.splits["zeroshot"]) and set(sub.labels["digit"]) == {3, 7}
    assert sub.views["left"].shape == (len(sub), 32)


@pytest.mark.parametrize("kw, match", [
    ({"holdout_digits": [12]}, r"holdout_digits must be in 0\.\.9"),
    ({"holdout_digits": list(range(10))}, "every digit"),
    ({"image_size": 4}, "image_size"),
    ({"captions_per_image": 0}, "captions_per_image"),
    ({"val_fraction": 0.5}, "sum to 1"),
    ({"resolution": 16}, "unknown digits option"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kw)
