"""Tests of experiments.runners.bridge: config validation, attribute parsing, an end-to-end run with a tiny Llama."""
from __future__ import annotations

import json

import pytest

from experiments.config import ConfigError
from experiments.runners import bridge


def test_load_defaults_and_errors():
    cfg = bridge.load({}, "bridge.yaml")
    assert cfg.connectors == ["linear", "mlp2x_gelu"] and cfg.inits == ["seeded", "random"]
    assert cfg.train.max_steps == 60 and cfg.train.monitor == "val_caption_nll"
    cfg = bridge.load({"train": {"max_steps": 5, "lr": "3e-4"}, "connector_options": {"perceiver": {"dim": 64}}})
    assert cfg.train.lr == 3e-4 and cfg.connector_options == {"perceiver": {"dim": 64}}
    with pytest.raises(ConfigError, match=r"unknown connector 'resampler'.*known connectors: gated_xattn, linear, "
                                          r"mlp2x_gelu, perceiver, qformer"):
        bridge.load({"connectors": ["linear", "resampler"]}, "bridge.yaml")
    with pytest.raises(ConfigError, match="unknown key bridge.yaml.seeding.solver; valid keys of bridge.yaml.seeding"):
        bridge.load({"seeding": {"solver": "svd"}}, "bridge.yaml")
    with pytest.raises(ConfigError, match="unknown init 'pretrained'"):
        bridge.load({"inits": ["pretrained"]})
    with pytest.raises(ConfigError, match="seeding.method must be one of lstsq, procrustes"):
        bridge.load({"seeding": {"method": "ols"}})
    with pytest.raises(ConfigError, match="connector_options.qformer.num_latents"):
        bridge.load({"connector_options": {"qformer": {"num_latents": 4}}})
    with pytest.raises(ConfigError, match="unknown key config.optimizer"):
        bridge.load({"optimizer": "sgd"})


def test_bundled_yaml_is_valid():
    from experiments.config import config_path, read_yaml

    cfg = bridge.load(read_yaml(config_path("bridge_shapesworld")), "bridge_shapesworld.yaml")
    assert cfg.experiment == "bridge"


def test_attribute_parsing_and_metrics():
    assert bridge.parse_attributes("A Crimson disc left of two plus signs; golden rhombus") == [
        ("colour", "red"), ("shape", "circle"), ("shape", "cross"), ("colour", "yellow"), ("shape", "diamond")]
    scenes = [{"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]},
              {"objects": [{"colour": "green", "shape": "square"}]}]
    m = bridge.attribute_metrics(["a red star and a green circle", "nothing here"], scenes)
    assert m["attribute_accuracy"] == pytest.approx(3 / 4)  # red, star, circle right; green wrong
    assert m["object_precision"] == 0.0  # "red star" and "green circle" are not objects of scene 0
    assert m["attribute_recall"] == pytest.approx(3 / 6)  # scene 0: red, blue, circle, star; scene 1: green, square
    assert m["attribute_accuracy_other_scene"] == pytest.approx(1 / 4)  # only "green" is in scene 1
    assert m["named_per_caption"] == 2.0


@pytest.mark.slow
def test_run_end_to_end_with_a_tiny_llama(tmp_path):
    raw = {"data": {"n_scenes": 60, "image_size": 64},
           "llm": {"name_or_path": "tiny", "max_caption_tokens": 16, "prompt": "Caption:"},
           "connectors": ["mlp2x_gelu", "gated_xattn"], "connector_options": {"gated_xattn": {"every": 2, "heads": 4}},
           "seeding": {"n_components": 4, "scales": [1.0, 2.0], "n_calibration_captions": 4},
           "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2, "log_every": 1, "progress": False},
           "eval": {"n_eval_images": 4, "captions_per_image": 1, "max_new_tokens": 3, "n_val_captions": 4},
           "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    results = bridge.run(bridge.load(raw))
    out = tmp_path / "out"
    assert set(results["runs"]) == {"mlp2x_gelu/seeded", "mlp2x_gelu/random", "gated_xattn/seeded",
                                    "gated_xattn/random"}
    keys = {"caption_nll_step0", "caption_nll", "no_image_nll", "shuffled_image_nll", "attribute_accuracy",
            "hard_negative_ranking", "steps", "train_seconds", "n_trainable", "curves"}
    for key, r in results["runs"].items():
        assert keys <= set(r), key
        assert r["steps"] == 3 and r["n_trainable"] > 0
        assert [s for s, _ in r["curves"]["val_caption_nll"]] == [0, 2, 3]
        assert len(r["curves"]["train_loss"]) == 3
        assert 0.0 <= r["attribute_accuracy"] <= 1.0 and 0.0 <= r["hard_negative_ranking"] <= 100.0
    xa = results["runs"]["gated_xattn/random"]
    assert xa["caption_nll_step0"] == pytest.approx(xa["no_image_nll"], abs=1e-5)  # gates at 0: the bare LM
    assert set(results["comparisons"]) == {"mlp2x_gelu", "gated_xattn"}
    assert "seed_map" in results["setup"] and results["exported_connector"] == "mlp2x_gelu"
    calib = results["setup"]["calibration"]
    assert calib["scale"] in (1.0, 2.0) and calib["mlp_mode"] in ("shift", "identity")
    for name in ("results.json", "report_bridge.md", "bridge_loss_curves.png", "projector/mm_projector.bin",
                 "projector/mm_projector_config.json", "runs/mlp2x_gelu-seeded/connector.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    table = bridge.format_results(results)
    assert table.count("\n| mlp2x_gelu/") == 2 and "fraction of random's steps" in table
