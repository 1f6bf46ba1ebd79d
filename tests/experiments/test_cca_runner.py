"""The cca runner (``alignfuse run nutrimouse``, ``alignfuse run mfeat_cca``) on tiny fixtures built here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.config import ConfigError, apply_overrides, config_path, read_yaml
from experiments.runners import cca as runner
from experiments.runners import runner_module
from tests.experiments.test_real_loaders import _nutrimouse

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(tmp_path) -> dict:
    _nutrimouse(tmp_path / "nm", n=12, p=15, q=4)
    raw = read_yaml(config_path("nutrimouse"))
    return {**raw, "out_dir": str(tmp_path / "out"), "data": {"name": "nutrimouse", "path": str(tmp_path / "nm")}}


@pytest.mark.parametrize("name", ["nutrimouse", "mfeat_cca"])
def test_bundled_configs_validate_and_are_registered(name):
    assert runner_module("cca") is runner
    cfg = runner.load(read_yaml(config_path(name)))
    assert cfg.reference


@pytest.mark.parametrize("override, match", [
    ("cca={n_comp: 3}", r"unknown key cca\.n_comp; valid keys of cca: n_components"),
    ("cca={n_components: 0}", "cca.n_components must be a positive int or null"),
    ("pairs=[[gene, gene]]", "two different views"),
    ("fit_on=test", "fit_on"),
    ("data.pathh=x", "pathh"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        runner.load(apply_overrides(_tiny(tmp_path), [override]))


def test_nutrimouse_end_to_end_equals_the_closed_form(tmp_path):
    from experiments.data.real.nutrimouse import LAMBDA1, LAMBDA2, loo_score, rcca_reference

    res = runner.run(runner.load(_tiny(tmp_path)))
    (p,) = res["pairs"]
    assert p["pair"] == ["gene", "lipid"] and p["n_fit"] == 12 and p["n_components"] == 4
    assert (p["reg_x"], p["reg_y"]) == (LAMBDA1, LAMBDA2)
    assert p["reference"]["max_abs_diff"] < 1e-8
    x = np.loadtxt(tmp_path / "nm" / "gene.csv", delimiter=",", skiprows=1)
    y = np.loadtxt(tmp_path / "nm" / "lipid.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(p["reference"]["rho"], rcca_reference(x, y, LAMBDA1, LAMBDA2).cor, atol=1e-6)
    assert p["loo"]["aligned"] == pytest.approx(loo_score(x, y), abs=1e-6)
    report = (tmp_path / "out" / "report_cca.md").read_text()
    assert "| gene–lipid | 12 | 0.008096, 0.064 |" in report
    assert json.loads((tmp_path / "out" / "results.json").read_text())["pairs"][0]["loo"] == p["loo"]


def test_every_pair_with_held_out_rows(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 2))
    views = {m: z @ rng.normal(size=(2, d)) + 0.2 * rng.normal(size=(60, d)) for m, d in (("a", 5), ("b", 4), ("c", 3))}
    np.savez(tmp_path / "mv.npz", **views, labels=np.arange(60) % 3)
    raw = {"experiment": "cca", "out_dir": str(tmp_path / "out"), "data": {"name": "multiview",
           "path": str(tmp_path / "mv.npz")}, "cca": {"n_components": 2, "reg": 1e-3}, "standardise": True,
           "fit_on": "train_val", "reference": True}
    res = runner.run(runner.load(raw))
    assert [p["pair"] for p in res["pairs"]] == [["a", "b"], ["a", "c"], ["b", "c"]]
    for p in res["pairs"]:
        assert p["n_fit"] == 48 and len(p["test"]) == 2 and p["test"][0] > 0.8  # two shared factors
        assert p["reference"]["max_abs_diff"] < 1e-8
    with pytest.raises(ValueError, match=r"unknown view\(s\) \['d'\]; views of multiview: a, b, c"):
        runner.run(runner.load({**raw, "pairs": [["a", "d"]]}))
