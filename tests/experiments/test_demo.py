"""``alignfuse demo`` end to end with tiny settings: results.json schema and every linked picture exists."""
from __future__ import annotations

import json
import re

import pytest

from experiments.demo import run_demo

TINY = {
    "align": {
        "data": {"n_scenes": 60, "image_size": 64, "seed": 1, "max_eval_images": 6},
        "aligners": {"cca": {"n_components": 8, "reg": 0.1}, "clip": {"embed_dim": 16}},
        "train": {"max_steps": 2, "batch_size": 32, "progress": False},
    },
    "fusion": {
        "data": {"n_scenes": 60, "image_size": 64, "seed": 1, "cnn_pixels": 16, "flat_pixels": 8},
        "tasks": ["nearest_colour"],
        "strategies": {"unimodal": {"embed_dim": 8, "hidden": 16}, "feature/concat": {"embed_dim": 8, "hidden": 16},
                       "decision/mean": {}},
        "train": {"max_steps": 2, "batch_size": 16},
        "robustness": {"rates": [0.0, 1.0]},
        "latency_samples": 2,
    },
    "bridge": {
        "data": {"n_scenes": 60, "image_size": 64, "seed": 1},
        "llm": {"name_or_path": "tiny", "max_caption_tokens": 16, "prompt": "Caption:"},
        "connectors": ["mlp2x_gelu"],
        "stage2": {"connector": "mlp2x_gelu"},
        "seeding": {"n_components": 4, "scales": [1.0], "n_calibration_captions": 4},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "log_every": 1, "progress": False},
        "eval": {"n_eval_images": 4, "captions_per_image": 1, "max_new_tokens": 3, "n_val_captions": 4},
    },
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, overrides=TINY)


def test_results_json_schema(demo):
    out, results = demo
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"alignment", "fusion", "bridge"}
    for name in ("cca", "clip"):
        a = saved["alignment"][name]
        for direction in ("image_to_text", "text_to_image"):
            assert set(a[direction]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
        for key in ("rsum", "hard_negative_accuracy", "n_test_images", "train_seconds"):
            assert isinstance(a[key], (int, float)), key
        assert a["n_test_images"] == 6
    task = saved["fusion"]["nearest_colour"]
    assert {"feature/concat", "decision/mean"} <= set(task)
    for name, r in task.items():
        assert isinstance(r["accuracy"], float) and isinstance(r["params"], int)
        assert set(r["missing_modality"]) == {"image", "depth"}, name
    assert {"mlp2x_gelu/seeded", "mlp2x_gelu/random"} <= set(saved["bridge"])
    for r in (saved["bridge"][k] for k in ("mlp2x_gelu/seeded", "mlp2x_gelu/random")):
        for key in ("caption_nll_step0", "caption_nll", "no_image_nll", "attribute_accuracy"):
            assert isinstance(r[key], float), key


def test_report_links_existing_pictures_and_projector(demo):
    out, results = demo
    report = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 5  # recall bars, shared-space map, robustness curves, loss curves, examples
    for rel in links:
        assert not rel.startswith("/") and (out / rel).is_file(), rel
    for needle in ("align_recall", "align_space", "fusion_robustness", "bridge_loss_curves", "examples_retrieval"):
        assert any(needle in link for link in links), needle
    assert (out / "mm_projector.bin").is_file() and (out / "mm_projector_config.json").is_file()
    sidecar = json.loads((out / "mm_projector_config.json").read_text())
    assert sidecar["mm_projector_type"] == "mlp2x_gelu"


def test_demo_passes_overrides_and_part_names_take_their_options_from_one_home():
    from experiments.config import config_path, read_yaml
    from experiments.demo import DEMO_ALIGN, DEMO_FUSION, _deep_update
    from experiments.runners.fusion import Config

    bundled = read_yaml(config_path("fusion_shapesworld"))
    defaults = Config().model_dump()
    raw = _deep_update(bundled, DEMO_FUSION, defaults)
    assert list(raw["strategies"]) == DEMO_FUSION["strategies"]
    assert all(raw["strategies"][n] == (defaults["strategies"][n] or {}) for n in raw["strategies"])
    with pytest.raises(KeyError, match=r"strategies \['feature/nope'\] are not in the bundled config"):
        _deep_update(bundled, {"strategies": ["feature/nope"]}, defaults)
    align = read_yaml(config_path("align_shapesworld"))
    raw = _deep_update(align, DEMO_ALIGN)
    assert raw["aligners"]["cca"] == align["aligners"]["cca"]  # options come from the bundled config, not a copy
    assert raw["aligners"]["gnn"]["train"] == {**align["aligners"]["gnn"]["train"], "max_steps": 100,
                                               "batch_size": 128}
    assert raw["train"] == {**align["train"], "max_steps": 150, "warmup_steps": 10}  # only what differs
