"""The config system: one merge rule, typed and range-checked values, unknown keys listing the valid ones."""
from __future__ import annotations

from typing import Any, Optional

import pytest
from pydantic import Field

from experiments.config import ConfigError, DataSection, RunConfig, TrainSection, load_config


class Cfg(RunConfig):
    experiment: str = "toy"
    out_dir: str = "runs/toy"
    data: DataSection = DataSection(name="shapesworld", n_scenes=100, image_size=64)
    parts: dict[str, Optional[dict[str, Any]]] = Field(default_factory=lambda: {"a": {"x": 1}, "b": {}})
    train: TrainSection = TrainSection(max_steps=50, lr=2e-3)


def test_partial_sections_merge_and_part_selections_replace():
    cfg = load_config(Cfg, {"train": {"batch_size": 8}, "data": {"image_size": 32}, "parts": {"b": {"y": 2}}})
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.batch_size) == (50, 2e-3, 8)
    assert cfg.data.options() == {"n_scenes": 100, "image_size": 32}
    assert cfg.parts == {"b": {"y": 2}}
    other = load_config(Cfg, {"data": {"name": "csv", "path": "x.tsv"}})
    assert other.data.options() == {"path": "x.tsv"}  # the default source's options do not follow
    assert load_config(Cfg, {}, overrides=["train.lr=1e-4", "seeds=[3]"]).train.lr == 1e-4  # YAML "1e-4" string
    file = {"data": {"n_scenes": 5}}  # a config file's options for its source ...
    moved = load_config(Cfg, file, overrides=["data.name=karpathy", "data.path=k.json"])
    assert moved.data.options() == {"path": "k.json"}  # ... do not follow an override to another source
    assert load_config(Cfg, file, overrides=["data.name=shapesworld"]).data.n_scenes == 5


def test_part_train_override_merges_onto_the_runs_section():
    cfg = load_config(Cfg, {})
    t = cfg.train.merged({"lr": 0.5}, "c.yaml", "parts.a.train")
    assert (t.lr, t.max_steps) == (0.5, 50)
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key parts\.a\.train\.lrr; valid keys of parts\.a\.train"):
        cfg.train.merged({"lrr": 0.5}, "c.yaml", "parts.a.train")
    tc = cfg.train.trainer_config(seed=3, out_dir="u", monitor="accuracy")
    assert (tc.seed, tc.out_dir, tc.monitor, tc.max_steps, tc.save_every) == (3, "u", "accuracy", 50, 100)


@pytest.mark.parametrize("override, match", [
    ("seeds=[0.5]", r"seeds\.0: Input should be a valid integer"),
    ("seeds=[1,1]", r"seeds must be distinct"),
    ("seeds=[]", r"seeds: List should have at least 1 item"),
    ("train.device=tpu", r"train\.device: .*auto, cpu, mps, cuda or cuda:N, got 'tpu'"),
    ("train.device=cuda:1x", r"train\.device"),
    ("train.lr=-1", r"train\.lr: Input should be greater than 0"),
    ("train.weight_decay=-1", r"train\.weight_decay: Input should be greater than or equal to 0"),
    ("train.max_steps=true", r"train\.max_steps: Input should be a valid integer"),
    ("train.max_steps=1.5", r"train\.max_steps: Input should be a valid integer"),
    ("train.lr=true", r"train\.lr: .*boolean"),
    ("train.progress=1", r"train\.progress: Input should be a valid boolean"),
    ("train.betas=[0.9,1.5]", r"train\.betas\.1: Input should be less than or equal to 1"),
    ("train.out_dir=x", r"unknown key train\.out_dir; valid keys of train: batch_size, betas"),
    ("trian.lr=1", r"unknown key trian; valid keys of the top level: cache_dir, data, experiment, out_dir, parts"),
])
def test_bad_values_fail_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, {}, where="c.yaml", overrides=[override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(Cfg, {}, overrides=["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(Cfg, {"out_dir": "r"}, overrides=["out_dir.x=1"])
