"""The bridge on an image–caption set with no scene metadata (a CSV built here), through the data layer
(:mod:`experiments.views`): config checks, the adapted data, and a whole run with a tiny Llama. ShapesWorld-only
evaluations (attribute accuracy, hard negatives, VQA) are skipped; stage 2 on a caption set is a ConfigError."""
from __future__ import annotations

import numpy as np
import pytest

from experiments.config import ConfigError
from experiments.runners import bridge

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def _caption_csv(folder, n: int = 40) -> str:
    """``n`` 32-px images of one coloured square on grey, and a TSV (open_clip's layout) captioning each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        img = np.full((32, 32, 3), 128, np.uint8)
        x, y = rng.integers(2, 16, size=2)
        img[y:y + 14, x:x + 14] = COLOURS[colour]
        Image.fromarray(img).save(folder / f"im{i}.png")
        where = f"{'top' if y < 9 else 'bottom'} {'left' if x < 9 else 'right'}"
        rows.append(f"im{i}.png\ta {colour} square at the {where}\n")
    path = folder / "captions.tsv"
    path.write_text("filepath\ttitle\n" + "".join(rows))
    return str(path)


def _raw(tmp_path, **changes) -> dict:
    path = _caption_csv(tmp_path / "data")
    raw = {"data": {"name": "csv", "path": path, "image_root": str(tmp_path / "data"), "image_size": 64},
           "vision": {"tokens": 4}, "llm": {"name_or_path": "tiny", "max_caption_tokens": 12, "prompt": "Caption:"},
           "seeding": {"n_components": 2, "scales": [1.0, 2.0], "n_calibration_captions": 4},
           "method": {"style_tokens": 2},
           "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2, "log_every": 1, "progress": False},
           "eval": {"n_eval_images": 4, "captions_per_image": 1, "max_new_tokens": 3, "n_val_captions": 4,
                    "n_examples": 4},
           "stage2": {"enabled": False}, "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    raw.update(changes)
    return raw


def test_caption_set_config_checks(tmp_path):
    raw = _raw(tmp_path)
    cfg = bridge.load(raw, "b.yaml")
    assert cfg.data.name == "csv" and cfg.data.image_size == 64 and "n_scenes" not in cfg.data.model_dump()
    assert "seed" not in cfg.data.views_section().model_dump()  # ShapesWorld's generator seed is not a CSV option
    with pytest.raises(ConfigError, match=r"b.yaml: stage2.enabled: stage 2 \(visual questions\) is built from "
                                          r"ShapesWorld scene metadata.*set stage2.enabled=false"):
        bridge.load({**raw, "stage2": {}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"data.path: .*nowhere.tsv does not exist"):
        bridge.load({**raw, "data": {**raw["data"], "path": str(tmp_path / "nowhere.tsv")}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"unknown key .*n_scenes"):
        bridge.load({**raw, "data": {**raw["data"], "n_scenes": 40}}, "b.yaml")
    assert bridge.load({"data": {"n_scenes": 40}}).data.n_scenes == 40  # ShapesWorld keeps its defaults


def test_caption_set_is_adapted_for_the_bridge(tmp_path):
    from experiments.bridge.features import CaptionSet, load_images_and_captions

    data = load_images_and_captions(bridge.load(_raw(tmp_path)))
    assert isinstance(data, CaptionSet) and data.scenes is None and data.hard_negatives is None
    assert sum(len(v) for v in data.splits.values()) == 40 and all(len(v) for v in data.splits.values())
    caps, t2i = data.flat_captions("train")
    assert len(caps) == len(data.splits["train"]) and t2i.tolist() == list(range(len(caps)))
    assert data.images[0].shape == (64, 64, 3) and data.images[0].dtype == np.uint8


@pytest.mark.slow
def test_bridge_runs_on_a_csv_caption_set_with_a_tiny_llama(tmp_path):
    results = bridge.run(bridge.load(_raw(tmp_path, connectors=["mlp2x_gelu"])))
    assert set(results["runs"]) == {"mlp2x_gelu/seeded", "mlp2x_gelu/random"} and "vqa" not in results
    for r in results["runs"].values():
        assert r["steps"] == 3 and np.isfinite(r["caption_nll"]) and np.isfinite(r["shuffled_image_nll"])
        assert "attribute_accuracy" not in r and "hard_negative_ranking" not in r  # no scene metadata
        assert len(r["samples"]) == 4 and "square at the" in r["samples"][0]["reference"]
    assert "colour_word_top1_val" not in results["setup"]["seed_map"]
    assert (tmp_path / "out" / "report_bridge.md").is_file()
