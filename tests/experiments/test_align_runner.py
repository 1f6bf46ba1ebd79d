"""The aligner comparison runner: config validation before work, end-to-end schema on tiny data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.config import ConfigError, apply_overrides, config_path, read_yaml
from experiments.runners import align as runner


def _tiny(tmp_path, aligners) -> dict:
    return {
        "experiment": "align",
        "data": {"name": "shapesworld", "n_scenes": 60, "image_size": 64, "seed": 3, "max_eval_images": 6},
        "seeds": [0],
        "aligners": aligners,
        "train": {"max_steps": 3, "batch_size": 32, "progress": False},
        "out_dir": str(tmp_path / "out"),
    }


def test_bundled_config_validates():
    cfg = runner.load(read_yaml(config_path("align_shapesworld")))
    assert set(cfg.aligners) == {"cca", "cycle_ae", "devise", "clip", "gnn", "clip_towers"}
    assert len(cfg.seeds) >= 3


@pytest.mark.parametrize(
    "override, match",
    [
        ("aligners={nope: {}}", "unknown aligner 'nope'; known aligners: cca, clip"),
        ("aligners={cca: {n_comp: 3}}", r"unknown key aligners\.cca\.n_comp; valid keys of aligners\.cca: n_components"),
        ("train.lrr=0.1", r"unknown key train\.lrr; valid keys of train: "),
        ("aligners={clip: {train: {stepz: 3}}}", r"unknown key aligners\.clip\.train\.stepz"),
        ("data.view=halves", "data.view must be"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, monkeypatch, override, match):
    import experiments.data as data

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the dataset was loaded before the config was validated")

    monkeypatch.setattr(data, "load_shapesworld", boom)
    raw = apply_overrides(_tiny(tmp_path, {"cca": {}}), [override])
    with pytest.raises(ConfigError, match=match):
        runner.load(raw)


def test_end_to_end_tiny(tmp_path):
    cfg = runner.load(_tiny(tmp_path, {"cca": {"n_components": 8, "reg": 0.01}, "clip": {"embed_dim": 16}}))
    res = runner.run(cfg)
    assert set(res["aligners"]) == {"cca", "clip"}
    for name, r in res["aligners"].items():
        for direction in ("image_to_text", "text_to_image"):
            for key in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
                assert np.isfinite(r[direction][key]), (name, direction, key)
        assert r["n_test_images"] == 6
        assert 0.0 <= r["hard_negative_accuracy"] <= 100.0
        assert r["rsum"] == pytest.approx(sum(r[d][f"R@{k}"] for d in ("image_to_text", "text_to_image")
                                              for k in (1, 5, 10)))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["aligners"]["cca"]["rsum"] == pytest.approx(res["aligners"]["cca"]["rsum"])
    report = (tmp_path / "out" / "report_align.md").read_text()
    assert "| cca |" in report and "align_recall.png" in report
    assert (tmp_path / "out" / "align_recall.png").exists()
    emb = tmp_path / "out" / "embeddings" / "clip"
    assert np.load(emb / "image_emb.npy").shape[0] == 6
    assert len(np.load(emb / "text_to_image.npy")) == len(np.load(emb / "text_emb.npy"))


def test_aligner_lacking_inputs_is_skipped_with_reason(tmp_path):
    raw = _tiny(tmp_path, {"cca": {"n_components": 4}, "gnn": {}})
    raw["data"] = {"name": "digits", "view": "halves", "image_size": 16, "max_eval_images": 20}
    res = runner.run(runner.load(raw))
    assert "cca" in res["aligners"]
    assert "grid" in res["skipped"]["gnn"] and "graph" in res["skipped"]["gnn"]
