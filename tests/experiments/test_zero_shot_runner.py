"""The zero_shot runner (``alignfuse run fashion_mnist``) on tiny Fashion-MNIST files built here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.config import ConfigError, apply_overrides, config_path, read_yaml
from experiments.runners import runner_module
from experiments.runners import zero_shot as runner
from tests.experiments.test_fetch import fashion_files

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(tmp_path) -> dict:
    fashion_files(tmp_path / "fm", per_class=(12, 4))
    return {"experiment": "zero_shot", "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
            "data": {"name": "fashion_mnist", "path": str(tmp_path / "fm"), "train_per_class": 10,
                     "test_per_class": 3},
            "image_size": 32, "seeds": [0, 1], "train": {"max_steps": 4, "batch_size": 32, "progress": False}}


def test_bundled_config_validates_and_is_registered():
    assert runner_module("zero_shot") is runner
    cfg = runner.load(read_yaml(config_path("fashion_mnist")))
    assert cfg.data.name == "fashion_mnist" and cfg.devise == {"margin": 0.1} and len(cfg.seeds) == 3


@pytest.mark.parametrize("override, match", [
    ("devise={margn: 0.1}", r"unknown key devise\.margn; valid keys of devise: margin"),
    ("devise={targets: captions}", "devise.targets must be 'labels'"),
    ("data={name: mfeat}", "'mfeat' has no unseen classes"),
    ("image_encoder=nope", "image_encoder: unknown encoder 'nope'"),
    ("data.train_per_clas=3", "train_per_clas"),
])
def test_bad_config_fails_before_any_work(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        runner.load(apply_overrides(_tiny(tmp_path), [override]))


def test_end_to_end_tiny_and_resume(tmp_path):
    cfg = runner.load(_tiny(tmp_path))
    res = runner.run(cfg)
    assert res["unseen"] == ["Pullover", "Ankle boot"]
    assert res["n"] == {"train_seen": 72, "train_upper_bound": 90, "test_seen": 24, "test_unseen": 6}
    for block in ("devise", "upper_bound"):
        for group in ("unseen_only", "unseen", "seen"):
            assert 0 <= res[block][group]["hit@1"] <= res[block][group]["hit@5"] <= 1, (block, group)
    assert res["devise"]["unseen_only"]["hit@2"] == pytest.approx(1.0)  # two unseen labels: always in the top 2
    assert res["chance"]["unseen_only"]["hit@1"] == 0.5 and res["chance"]["unseen"]["hit@5"] == 0.5
    assert len(res["devise_per_seed"]) == 2
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["unseen"] == ["Pullover", "Ankle boot"]
    report = (out / "report_zero_shot.md").read_text()
    assert "| DeViSE (2 seeds) |" in report and "| chance | 50.0 | 10.0 | 50.0 | 10.0 | 50.0 |" in report
    # a rerun keeps the finished units (same numbers, no training)
    mtime = (out / "units" / "devise" / "seed0" / "result.json").stat().st_mtime
    again = runner.run(cfg)
    assert again["devise_per_seed"] == res["devise_per_seed"]
    assert (out / "units" / "devise" / "seed0" / "result.json").stat().st_mtime == mtime
