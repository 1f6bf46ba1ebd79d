"""Tests of experiments.runners.bridge: config validation, attribute parsing, an end-to-end run with a tiny Llama."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.config import ConfigError
from experiments.bridge.evaluate import attribute_metrics, paired_gain, parse_attributes
from experiments.bridge.seed import aligner_pairs
from experiments.runners import bridge


def test_load_defaults_and_errors():
    cfg = bridge.load({}, "bridge.yaml")
    assert cfg.connectors == ["mlp2x_gelu"] and cfg.inits == ["seeded", "random"]
    assert cfg.train.max_steps == 150 and cfg.train.monitor == "val_caption_nll" and cfg.train.lr == 6e-4
    assert cfg.vision.encoder == "mobilenet_v2" and cfg.seeding.fit_on == "tokens" and cfg.stage2.enabled
    cfg = bridge.load({"train": {"max_steps": 5, "lr": "3e-4"}, "connector_options": {"perceiver": {"dim": 64}}})
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 8  # a partial train section keeps the bridge defaults
    assert cfg.connector_options == {"perceiver": {"dim": 64}}
    with pytest.raises(ConfigError, match=r"unknown connector 'resampler'.*known connectors: gated_xattn, grid_tags, linear, "
                                          r"mlp2x_gelu, perceiver, qformer"):
        bridge.load({"connectors": ["linear", "resampler"]}, "bridge.yaml")
    with pytest.raises(ConfigError, match="unknown key seeding.solver; valid keys of seeding"):
        bridge.load({"seeding": {"solver": "svd"}}, "bridge.yaml")
    for bad, match in ((({"inits": ["pretrained"]}), "inits.0"), ({"seeding": {"method": "ols"}}, "seeding.method"),
                       ({"seeding": {"fit_on": "cells"}}, "seeding.fit_on"), ({"train": {"lr": -1}}, "train.lr"),
                       ({"stage2": {"train": {"max_steps": True}}}, "stage2.train.max_steps"),
                       ({"vision": {"tokens": 3}}, "square number"), ({"method": {"style_tokens": -1}},
                                                                      "method.style_tokens")):
        with pytest.raises(ConfigError, match=match):
            bridge.load(bad)
    with pytest.raises(ConfigError, match="connector_options.qformer.num_latents"):
        bridge.load({"connector_options": {"qformer": {"num_latents": 4}}})
    with pytest.raises(ConfigError, match="unknown vision.encoder 'resnet'; known encoders: .*open_clip_image"):
        bridge.load({"vision": {"encoder": "resnet"}})
    with pytest.raises(ConfigError, match="vision.encoder 'minilm' encodes text, not images"):
        bridge.load({"vision": {"encoder": "minilm"}})
    with pytest.raises(ConfigError, match="vision.options.model"):
        bridge.load({"vision": {"encoder": "open_clip_image", "options": {"model": "ViT-B-32"}}})
    with pytest.raises(ConfigError, match="unknown key optimizer"):
        bridge.load({"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="stage2.connector 'qformer' is not in connectors"):
        bridge.load({"stage2": {"connector": "qformer"}})


def test_bundled_yaml_is_valid():
    from experiments.config import config_path, read_yaml

    cfg = bridge.load(read_yaml(config_path("bridge_shapesworld")), "bridge_shapesworld.yaml")
    assert cfg.experiment == "bridge"


def test_attribute_parsing_and_metrics():
    assert parse_attributes("A Crimson disc left of two plus signs; golden rhombus") == [
        ("colour", "red"), ("shape", "circle"), ("shape", "cross"), ("colour", "yellow"), ("shape", "diamond")]
    scenes = [{"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]},
              {"objects": [{"colour": "green", "shape": "square"}]}]
    m = attribute_metrics(["a red star and a green circle", "nothing here"], scenes)
    assert m["attribute_accuracy"] == pytest.approx(3 / 4)  # red, star, circle right; green wrong
    assert m["object_precision"] == 0.0  # "red star" and "green circle" are not objects of scene 0
    assert m["attribute_recall"] == pytest.approx(3 / 6)  # scene 0: red, blue, circle, star; scene 1: green, square
    assert m["attribute_accuracy_other_scene"] == pytest.approx(1 / 4)  # only "green" is in scene 1
    assert m["named_per_caption"] == 2.0


TINY = {"data": {"n_scenes": 40, "image_size": 64}, "vision": {"tokens": 4},
        "llm": {"name_or_path": "tiny", "max_caption_tokens": 12, "prompt": "Caption:"},
        "seeding": {"n_components": 4, "scales": [1.0, 2.0], "n_calibration_captions": 4},
        "method": {"style_tokens": 2, "content_weight": 2.0, "connector_lr_scale": 0.5},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2, "log_every": 1, "progress": False},
        "eval": {"n_eval_images": 4, "captions_per_image": 1, "max_new_tokens": 3, "n_val_captions": 4,
                 "n_examples": 4},
        "stage2": {"n_eval_scenes": 4, "inits": ["seeded"], "train": {"max_steps": 2, "batch_size": 4,
                                                                       "progress": False}}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge")
    raw = {**TINY, "connectors": ["mlp2x_gelu", "gated_xattn"],
           "connector_options": {"gated_xattn": {"every": 2, "heads": 4}},
           "out_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache")}
    return bridge.run(bridge.load(raw)), tmp


@pytest.mark.slow
def test_run_end_to_end_with_a_tiny_llama(tiny_run):
    results, tmp = tiny_run
    out = tmp / "out"
    assert set(results["runs"]) == {"mlp2x_gelu/seeded", "mlp2x_gelu/random", "gated_xattn/seeded",
                                    "gated_xattn/random"}
    keys = {"caption_nll_step0", "caption_nll", "no_image_nll", "shuffled_image_nll", "attribute_accuracy",
            "attribute_accuracy_other_scene", "distinct_examples", "hard_negative_ranking", "steps", "curves"}
    for key, r in results["runs"].items():
        assert keys <= set(r), key
        assert r["steps"] == 3 and r["n_trainable"] > 0 and 0 <= r["distinct_examples"] <= 4
        assert [s for s, _ in r["curves"]["val_caption_nll"]] == [0, 2, 3]
        assert 0.0 <= r["attribute_accuracy"] <= 1.0 and 0.0 <= r["hard_negative_ranking"] <= 100.0
    xa = results["runs"]["gated_xattn/random"]
    assert xa["gain_vs_no_image_step0"]["gain"] == pytest.approx(0.0, abs=1e-5)  # gates at 0: the bare LM
    g = results["runs"]["mlp2x_gelu/seeded"]["gain_vs_shuffled"]
    assert g["ci95"][0] <= g["gain"] <= g["ci95"][1]
    seed_map = results["setup"]["seed_map"]
    assert seed_map["aligner"]["fit_on"] == "tokens" and seed_map["calibration"]["scale"] in (1.0, 2.0)
    assert len(seed_map["calibration"]["linear_nll_by_scale"]) == 2  # mlp2x_gelu seeds from the scaled map
    assert results["setup"]["image_tokens"][0] == 4
    vqa = results["vqa"]
    assert set(vqa["runs"]) == {"seeded"} and vqa["connector"] == "mlp2x_gelu"
    r2 = vqa["runs"]["seeded"]
    for ev in ("image", "none_image", "shuffled_image", "majority", "held_out_phrasing"):
        assert 0.0 <= r2["stage2"][ev]["overall"] <= 100.0
    assert r2["steps"] == 2 and r2["stage1"]["image"]["overall"] >= 0
    for name in ("results.json", "report_bridge.md", "bridge_loss_curves.png", "projector/mm_projector.bin",
                 "model/bridge.json", "model/connector.pt", "model/adapter/adapter_config.json",
                 "runs/mlp2x_gelu-seeded/model/connector.pt", "runs/mlp2x_gelu-seeded-stage2/last.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    table = bridge.format_results(results)
    assert table.count("\n| mlp2x_gelu/seeded | ") == table.count("\n| mlp2x_gelu/random | ") == 1
    assert "VQA on 4 held-out scenes" in table and table.count("stage 1+2 | shuffled image |") == 1


@pytest.mark.slow
def test_ask_on_a_saved_tiny_run(tiny_run, tmp_path, capsys):
    from PIL import Image

    from experiments.ask import load_bridge
    from experiments.cli import main
    from experiments.data.shapesworld import load_shapesworld

    results, tmp = tiny_run
    out = tmp / "out"
    data = load_shapesworld(n_scenes=40, image_size=64, seed=0, cache_dir=tmp / "cache" / "datasets")
    model = load_bridge(out)
    answers = model.chat(data.images[:2], "What colour is the star?", max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # the loaded model equals the trained one: same answer through the saved features path
    png = tmp_path / "scene.png"
    Image.fromarray(data.images[0]).save(png)
    assert main(["ask", str(out), "--image", str(png), "What colour is the star?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == answers[0]
    batch = tmp_path / "q.jsonl"
    batch.write_text(json.dumps({"image": str(png), "question": "What colour is the star?"}) + "\n\n"
                     + json.dumps({"image": str(png), "question": "Is there a red circle?"}) + "\n")
    assert main(["ask", str(out), "--batch", str(batch), "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["question"] for x in lines] == ["What colour is the star?", "Is there a red circle?"]
    assert lines[0]["answer"] == answers[0] and "answer" in lines[1]
    for argv, msg in (([str(tmp_path / "nope"), "--image", str(png), "q?"], "does not exist"),
                      ([str(tmp_path), "--image", str(png), "q?"], "holds no trained bridge model"),
                      ([str(out), "--image", str(tmp_path / "q.jsonl"), "q?"], "cannot read image"),
                      ([str(out), "--image", str(png), "  "], "empty question")):
        assert main(["ask", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_aligner_pairs_tokens_pair_each_cell_with_a_caption_of_its_image():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(10, 4, 3)).astype(np.float32)  # 10 images, 4 cells
    pooled = grid.mean(1)
    image_idx = np.array([1, 3, 5, 7])  # the split's images
    t2i = np.array([0, 0, 1, 2, 2, 2, 3])  # caption row -> position in image_idx
    text = np.arange(7, dtype=np.float64)[:, None] * np.ones((1, 2))  # caption row r has features [r, r]

    img, txt = aligner_pairs("pooled", pooled, grid, image_idx, t2i, text)
    np.testing.assert_array_equal(img, pooled[image_idx][t2i])
    assert txt is text

    img, txt = aligner_pairs("tokens", pooled, grid, image_idx, t2i, text, seed=1)
    assert img.shape == (16, 3) and txt.shape == (16, 2)  # every cell of every image once
    for cell, caption in zip(img, txt[:, 0].astype(int)):
        pos = t2i[caption]  # the caption's image: the cell must be one of its cells
        assert any(np.array_equal(cell, c) for c in grid[image_idx[pos]]), (cell, caption)
    assert {tuple(c) for c in img} == {tuple(c) for c in grid[image_idx].reshape(-1, 3)}

    img, txt = aligner_pairs("tokens", pooled, grid, image_idx, t2i, text, max_rows=5)
    assert img.shape == (5, 3) and txt.shape == (5, 2)


def test_paired_gain_matches_hand_computation_and_checks_pairing():
    counts = np.array([2.0, 4.0, 4.0])
    control = (np.array([4.0, 8.0, 12.0]), counts)  # per token 2, 2, 3
    image = (np.array([2.0, 8.0, 4.0]), counts)  # per token 1, 2, 1
    g = paired_gain(control, image, n_boot=500)
    assert g["gain"] == pytest.approx((2 + 0 + 8) / 10)
    assert g["captions_better_pct"] == pytest.approx(100 * 2 / 3)
    assert g["ci95"][0] <= g["gain"] <= g["ci95"][1] and g["ci95"][0] >= 0.0
    with pytest.raises(ValueError, match="same captions"):
        paired_gain(control, (image[0], counts + 1))


def test_run_with_an_open_clip_vision_tower(tmp_path):
    """vision.encoder=open_clip_image: a (tiny, random) ViT's patch tokens feed the connector."""
    tiny_clip = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                                 "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    raw = {"data": {"n_scenes": 40, "image_size": 64},
           "vision": {"encoder": "open_clip_image", "options": {"model_name": tiny_clip, "seed": 1}, "tokens": None},
           "llm": {"name_or_path": "tiny", "max_caption_tokens": 12, "prompt": "Caption:"},
           "connectors": ["linear"], "inits": ["seeded"], "stage2": {"enabled": False},
           "seeding": {"n_components": 4, "scales": [1.0], "n_calibration_captions": 4},
           "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "log_every": 1, "progress": False},
           "eval": {"n_eval_images": 3, "captions_per_image": 1, "max_new_tokens": 2, "n_val_captions": 3},
           "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    results = bridge.run(bridge.load(raw))
    assert results["setup"]["vision_encoder"].endswith("-image")
    assert results["setup"]["grid_shape"][1:] == [16, 64]  # 4x4 patches of a 64-wide ViT
    # tiny Llama width 64: the linear projector plus the default learned style tokens
    style = bridge.Config().method.style_tokens
    assert results["runs"]["linear/seeded"]["n_trainable"] == 64 * 64 + 64 + style * 64
