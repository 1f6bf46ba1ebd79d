"""The real data sets as fetched (`alignfuse fetch NAME`); each test is skipped when its data set is not fetched.

Run them alone with ``pytest -m realdata``. Nothing here downloads.
"""
from __future__ import annotations

import numpy as np
import pytest

from experiments.data import load_dataset
from experiments.data.fetch import dataset_dir, read_manifest

pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("one_thread")]


def fetched(name: str):
    return pytest.mark.skipif(read_manifest(name) is None, reason=f"{name} not fetched (alignfuse fetch {name})")


@fetched("mfeat")
def test_mfeat():
    d = load_dataset("mfeat", fetch=False)
    assert {k: v.shape for k, v in d.views.items()} == {"fou": (2000, 76), "fac": (2000, 216), "kar": (2000, 64),
                                                        "pix": (2000, 240), "zer": (2000, 47), "mor": (2000, 6)}
    assert np.bincount(d.labels).tolist() == [200] * 10
    assert read_manifest("mfeat")["licence"] == "MIT"


@fetched("nutrimouse")
def test_nutrimouse_rcca_matches_the_closed_form_and_the_published_loo_score():
    from align.cca import CCA
    from experiments.data.real.nutrimouse import LAMBDA1, LAMBDA2, loo_score, rcca_reference

    d = load_dataset("nutrimouse", fetch=False)
    assert d.views["gene"].shape == (40, 120) and d.views["lipid"].shape == (40, 21)
    x = np.loadtxt(dataset_dir("nutrimouse") / "gene.csv", delimiter=",", skiprows=1)
    y = np.loadtxt(dataset_dir("nutrimouse") / "lipid.csv", delimiter=",", skiprows=1)
    ref = rcca_reference(x, y, LAMBDA1, LAMBDA2)
    cca = CCA(n_components=21, reg_x=LAMBDA1, reg_y=LAMBDA2, reg_mode="absolute").fit(x, y)
    np.testing.assert_allclose(cca.correlations_, ref.variate_cor, atol=1e-8)
    assert loo_score(x, y) == pytest.approx(0.880, abs=0.005)  # signs aligned across folds (DATA.md: ~0.880)


@fetched("basicmotions")
def test_basicmotions():
    d = load_dataset("basicmotions", fetch=False)
    assert d.views["accelerometer"].shape == (80, 3, 100) and d.class_names == ["Standing", "Running", "Walking",
                                                                                 "Badminton"]
    assert np.bincount(d.labels[d.splits["test"]]).tolist() == [10] * 4
    assert load_dataset("basicmotions", representation="summary", fetch=False).views["gyroscope"].shape == (80, 36)


@fetched("fashion_mnist")
def test_fashion_mnist():
    d = load_dataset("fashion_mnist", fetch=False)
    assert d.images.shape == (70000, 28, 28) and np.bincount(d.labels).tolist() == [7000] * 10
    assert len(d.splits["zeroshot"]) == 2000 and len(d.splits["test"]) == 8000


@fetched("tuxpaint")
def test_tuxpaint(tmp_path):
    from experiments.data.real.tuxpaint import find_rsvg, scan

    root = dataset_dir("tuxpaint")
    files, caps, cats, skipped = scan(root, find_rsvg(root))
    assert 690 <= len(files) <= 720 and "symbols" not in cats and len(set(cats)) == 15
    assert sum(f.suffix == ".svg" for f in files) > 200 or find_rsvg(root) is None
    assert all(c and "\n" not in c for c in caps) and skipped["mirror_variant"] == 11
