"""The fusion experiment runner: config validation before any work, end-to-end runs with tiny settings
(results schema, files, missing-modality entries), test-time corruption, paired tests, the unimodal baseline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import experiments.data as data_pkg
from experiments.config import ConfigError
from experiments.runners import fusion as R

ENTRY_KEYS = {"accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "params", "fusion_params", "train_seconds",
              "latency_ms", "missing_modality", "robustness", "per_seed", "gain_over_best_unimodal",
              "p_value_vs_best", "val_accuracy", "level"}


def _raw(**over) -> dict:
    raw = {
        "experiment": "fusion",
        "tasks": ["digits_halves"],
        "strategies": {"unimodal": {"embed_dim": 16, "hidden": 32}, "feature/concat": {"embed_dim": 16, "hidden": 32},
                       "feature/cross_attention": {"embed_dim": 16, "hidden": 32, "num_heads": 2, "num_layers": 1},
                       "decision/mean": {}},
        "seeds": [0, 1],
        "train": {"max_steps": 25, "batch_size": 64, "lr": 3e-3, "warmup_steps": 0},
        "robustness": {"rates": [0.0, 0.5, 1.0], "noise_std": 1.0},
        "latency_samples": 3,
    }
    raw.update(over)
    return raw


@pytest.fixture
def no_loading(monkeypatch):
    """Any dataset load fails the test: validation must happen before any work."""

    def boom(*a, **k):
        raise AssertionError("a dataset was loaded before the config was validated")

    monkeypatch.setattr(data_pkg, "load_shapesworld", boom)
    monkeypatch.setattr(data_pkg, "load_digits", boom)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "over, match",
    [
        ({"strategies": {"feature/concatt": {}}}, r"unknown strategy 'feature/concatt'.*feature/concat"),
        ({"strategies": {"late/mean": {}}}, r"valid names: unimodal, data/channel_stack"),
        ({"strategies": {"feature/concat": {"embed_dimm": 8}}}, r"strategies\.feature/concat\.embed_dimm.*embed_dim"),
        ({"strategies": {"feature/concat": {"in_dims": {"a": 1}}}}, r"unknown key .*in_dims"),
        ({"strategies": {"unimodal": {"width": 3}}}, r"strategies\.unimodal\.width.*embed_dim"),
        ({"strategies": {"decision/mean": {"estimator": {"CC": 1}}}}, r"estimator\.CC.*valid keys"),
        ({"strategies": {"decision/weighted": {"cv": 1}}}, r"cv must be an int >= 2"),
        ({"tasks": ["nearest_color"]}, r"nearest_colour, largest_shape, digits_halves"),
        ({"modalities": {"nearest_colour": ["image"]}, "tasks": ["nearest_colour"]}, r"at least two"),
        ({"modalities": {"nearest_colour": ["image", "audio"]}, "tasks": ["nearest_colour"]}, r"among"),
        ({"grid_tokens": ["decision/mean"]}, r"not a feature-level strategy"),
        ({"robustness": {"rates": [0.0, 1.5]}}, r"robustness\.rates\.1: Input should be less than or equal to 1"),
        ({"robustness": {"noise": 1.0}}, r"unknown key robustness\.noise; valid keys of robustness: noise_std"),
        ({"bogus": 1}, r"unknown key bogus; valid keys of the top level: cache_dir, data"),
        ({"train": {"out_dir": "x"}}, r"unknown key train\.out_dir; valid keys of train: batch_size"),
        ({"data": {"n_scenes": 0}, "tasks": ["nearest_colour"]}, r"n_scenes must be positive"),
        ({"seeds": [0.5]}, r"seeds\.0: Input should be a valid integer"),
        ({"train": {"device": "tpu"}}, r"train\.device: .*must be auto, cpu, mps, cuda or cuda:N"),
        ({"train": {"lr": -1}}, r"train\.lr: Input should be greater than 0"),
        ({"train": {"weight_decay": -1}}, r"train\.weight_decay: Input should be greater than or equal to 0"),
        ({"train": {"max_steps": True}}, r"train\.max_steps: Input should be a valid integer"),
        ({"data": {"name": "nope"}}, r"unknown dataset 'nope'; known: .*digits, embeddings.*multiview"),
        ({"data": {"name": "multiview", "path": "/no/such.npz"}}, r"data\.path: /no/such\.npz does not exist"),
    ],
)
def test_bad_config_fails_before_any_work(no_loading, over, match):
    with pytest.raises(ConfigError, match=match):
        R.load(_raw(**over), where="cfg")


def test_run_validates_a_directly_built_config_before_loading(no_loading, tmp_path):
    cfg = R.load(_raw(out_dir=str(tmp_path)), "cfg")
    cfg.strategies = {"feature/nope": {}}
    with pytest.raises(ConfigError, match="unknown strategy 'feature/nope'"):
        R.run(cfg)
    assert not (tmp_path / "results.json").exists()


def test_partial_sections_merge_onto_the_runners_defaults():
    cfg = R.load({"train": {"max_steps": 7}, "data": {"n_scenes": 99}}, "cfg")
    assert cfg.train.max_steps == 7
    assert (cfg.train.batch_size, cfg.train.monitor, cfg.train.progress) == (128, "accuracy", False)
    assert cfg.data.n_scenes == 99 and cfg.data.cnn_pixels == 64  # the rest of the data section is kept
    other = R.load({"data": {"name": "digits"}}, "cfg")  # another source: shapesworld's options do not apply
    assert other.data.options() == {} and other.task_modalities() == {"digits_halves": ["left", "right"]}


def test_bundled_yaml_is_valid(no_loading):
    from experiments.config import config_path, read_yaml

    cfg = R.load(read_yaml(config_path("fusion_shapesworld")), "fusion_shapesworld.yaml")
    assert list(cfg.task_modalities()) == ["nearest_colour", "largest_shape", "digits_halves"] and len(cfg.seeds) >= 3
    assert "text" not in cfg.task_modalities()["nearest_colour"]


# ------------------------------------------------------------------------------------------ pieces


def test_corrupt_drop_and_noise_are_nested_and_scaled():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 50)).astype(np.float32)
    inputs = {"a": x, "b": x.copy()}
    masks = [R.corrupt(inputs, "a", "drop", r, noise_std=1, noise_scale=1, seed=3)["a_mask"]
             for r in (0.0, 0.25, 0.5, 1.0)]
    assert [int((~m).sum()) for m in masks] == [0, 100, 200, 400]
    assert not (~masks[1] & masks[2]).any()  # nested: dropped at 25 % ⊂ dropped at 50 %
    out = R.corrupt(inputs, "a", "noise", 0.5, noise_std=2.0, noise_scale=3.0, seed=3)
    assert "a_mask" not in out and out["b"] is inputs["b"]
    changed = (out["a"] != x).any(axis=1)
    assert changed.sum() == 200 and np.array_equal(changed, ~masks[2])  # same rows as the drop
    assert np.std(out["a"][changed] - x[changed]) == pytest.approx(6.0, rel=0.05)
    pix = (rng.random((20, 8, 8, 3)) * 255).astype(np.uint8)
    noisy = R.corrupt({"image": pix}, "image", "noise", 1.0, noise_std=5.0, noise_scale=[60, 60, 60], seed=0,
                      pixels=True)["image"]
    assert noisy.dtype == np.float32 and noisy.min() >= 0.0 and noisy.max() <= 1.0
    clean = R.corrupt({"image": pix}, "image", "noise", 0.0, noise_std=5.0, noise_scale=60, seed=0, pixels=True)
    np.testing.assert_allclose(clean["image"], pix / 255.0, atol=1e-6)


def test_paired_tests_match_scipy_and_a_hand_computed_t():
    acc = {"a": [80.0, 82.0, 81.0], "b": [70.0, 75.0, 71.0], "c": [60.0, 61.0, 62.0], "d": [79.0, 81.0, 80.0]}
    entries = {n: {"val_accuracy": v[0], "accuracy": float(np.mean(v)), "per_seed": {"accuracy": v}}
               for n, v in acc.items()}
    from experiments.reports.fusion import _paired_tests

    ref, p = _paired_tests(entries)
    assert ref == "a" and math.isnan(p["a"])
    assert p["b"] == pytest.approx(stats.ttest_rel(acc["a"], acc["b"]).pvalue)
    d = np.subtract(acc["a"], acc["c"])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert p["c"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert math.isnan(p["d"])  # constant difference: undefined, not 0


def test_unimodal_classifier_gradients_and_missing_input():
    torch.manual_seed(0)
    model = R.fusion.UnimodalClassifier("image", 12, 4, embed_dim=8, hidden=16)
    batch = {"image": torch.randn(6, 12), "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    model.loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.name == "unimodal/image" and R.fusion.fusion_module_params(model) == 0
    model.eval()
    mask = torch.tensor([True, False, True, False, True, True])
    masked = model({"image": batch["image"] * float("nan"), "image_mask": torch.zeros(6, dtype=torch.bool)})
    absent = model({"image_mask": torch.zeros(6, dtype=torch.bool)})
    torch.testing.assert_close(masked, absent)  # absent rows are never read (NaN placeholders are fine)
    mixed = model({"image": batch["image"], "image_mask": mask})
    torch.testing.assert_close(mixed[mask], model({"image": batch["image"][mask]}))
    with pytest.raises(ValueError, match=r"inputs\['image'\] has shape"):
        model({"image": torch.randn(2, 5)})


# ------------------------------------------------------------------------------------------ end to end


def _check_schema(results: dict, task: str, names: set[str], modalities: list[str], rates: int) -> None:
    assert results["accuracy_unit"] == "percent"
    entries = results["tasks"][task]
    assert set(entries) == names
    for name, e in entries.items():
        assert ENTRY_KEYS <= set(e), (name, ENTRY_KEYS - set(e))
        assert 0.0 <= e["accuracy"] <= 100.0 and 0.0 <= e["macro_f1"] <= 100.0
        assert set(e["missing_modality"]) == set(modalities)
        rob = e["robustness"]
        assert len(rob["rates"]) == rates and rob["rates"][0] == 0.0 and rob["rates"][-1] == 100.0
        for how in ("drop", "noise"):
            assert set(rob[how]) == set(modalities) and all(len(v) == rates for v in rob[how].values())
            for m in modalities:  # rate 0 is the clean test set
                assert rob[how][m][0] == pytest.approx(e["accuracy"])
        for m in modalities:  # the per-sample mask at 100 % and the absent key agree
            assert rob["drop"][m][-1] == pytest.approx(e["missing_modality"][m])
        assert e["params"] >= e["fusion_params"] >= 0 and e["latency_ms"] > 0
    for f in results["files"]:
        assert Path(f).is_file(), f
    info = results["task_info"][task]
    assert info["modalities"] == modalities and info["reference"] in entries


def test_end_to_end_digits_two_seeds(tmp_path):
    results = R.run(R.load(_raw(out_dir=str(tmp_path)), "cfg"))
    names = {"unimodal/left", "unimodal/right", "feature/concat", "feature/cross_attention", "decision/mean"}
    _check_schema(results, "digits_halves", names, ["left", "right"], rates=3)
    e = results["tasks"]["digits_halves"]
    assert e["feature/concat"]["accuracy"] > 30.0  # 10 classes; far above chance even after 25 steps
    assert e["feature/concat"]["per_seed"]["seeds"] == [0, 1]
    # fusing both halves does not need either one: dropping one costs accuracy but leaves the other's
    assert e["decision/mean"]["missing_modality"]["left"] < e["decision/mean"]["accuracy"]
    assert e["unimodal/left"]["missing_modality"]["right"] == e["unimodal/left"]["accuracy"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"]["digits_halves"]["decision/mean"]["accuracy"] == pytest.approx(
        e["decision/mean"]["accuracy"])
    assert str(tmp_path / "results.json") in saved["files"]
    assert {Path(f).name for f in results["files"]} >= {"report_fusion.md", "fusion_robustness_digits_halves.png",
                                                       "fusion_robustness_digits_halves_noise-left.png"}
    text = R.format_results(results)
    assert "| strategy | accuracy % |" in text and "decision/mean" in text


def test_end_to_end_shapesworld_tiny(tmp_path):
    raw = _raw(
        out_dir=str(tmp_path / "out"), tasks=["nearest_colour", "largest_shape"], seeds=[0],
        data={"n_scenes": 40, "image_size": 64, "cnn_pixels": 16, "flat_pixels": 8}, cache_dir=str(tmp_path),
        strategies={"unimodal": {"embed_dim": 8, "hidden": 16}, "data/channel_stack": {"width": 4},
                    "feature/cross_attention": {"embed_dim": 8, "hidden": 16, "num_heads": 2, "num_layers": 1},
                    "decision/mean": {}},
        train={"max_steps": 3, "batch_size": 16},
    )
    results = R.run(R.load(raw, "cfg"))
    names = {"unimodal/image", "unimodal/depth", "data/channel_stack", "feature/cross_attention", "decision/mean"}
    _check_schema(results, "nearest_colour", names, ["image", "depth"], rates=3)
    e = results["tasks"]["nearest_colour"]
    assert e["feature/cross_attention"]["inputs"] == "grid" and e["decision/mean"]["inputs"] == "pooled"
    assert e["data/channel_stack"]["params"] == e["data/channel_stack"]["fusion_params"]  # no encoders at data level
    info = results["task_info"]["nearest_colour"]
    assert info["inputs"]["grid"] == "image [4, 1280], depth [4, 1280]"  # 2x2 grid at 64 px
    assert info["inputs"]["pixels"] == "image [16, 16, 3], depth [16, 16]"
    assert 0.0 <= info["caption_names_nearest_colour"] <= 100.0
    # with text among the modalities, data/channel_stack still gets its RGB and depth pixels
    assert results["tasks"]["largest_shape"]["data/channel_stack"]["missing_modality"]["text"] == pytest.approx(
        results["tasks"]["largest_shape"]["data/channel_stack"]["accuracy"])
    report = (tmp_path / "out" / "report_fusion.md").read_text()
    assert "replicated to 3 channels" in report and "fusion_robustness_nearest_colour.png" in report


def test_partial_modalities_keep_the_other_tasks_defaults(no_loading):
    cfg = R.load({"modalities": {"nearest_colour": ["image", "depth", "text"]}}, "cfg")
    mods = cfg.task_modalities()
    assert mods["nearest_colour"] == ["image", "depth", "text"]
    assert mods["largest_shape"] == ["image", "depth", "text"]
    assert mods["digits_halves"] == ["left", "right"]


def test_one_seed_reports_plain_numbers(tmp_path):
    raw = _raw(out_dir=str(tmp_path), seeds=[0], strategies={"feature/concat": {"embed_dim": 8, "hidden": 16},
                                                             "decision/mean": {}}, train={"max_steps": 3})
    text = R.format_results(R.run(R.load(raw, "cfg")))
    assert "±" not in text and "decision/mean" in text


def test_multiview_data_runs_with_no_code(tmp_path):
    """``data.name=multiview data.path=...``: any modality names, vectors and sequences, decision level via the
    Trainer; strategies that need pixels (or RGB + depth) are skipped with the reason."""
    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 3
    acc = rng.normal(size=(n, 3, 10)).astype(np.float32) + y[:, None, None]
    gene = rng.normal(size=(n, 7)).astype(np.float32) + y[:, None]
    np.savez(tmp_path / "views.npz", accel=acc, gene=gene, labels=y)
    raw = _raw(out_dir=str(tmp_path / "out"), seeds=[0], tasks=None, data={"name": "multiview",
                                                                          "path": str(tmp_path / "views.npz")},
               strategies={"unimodal": {"embed_dim": 8, "hidden": 16}, "data/channel_stack": {},
                           "data/concat": {"hidden": 16},
                           "feature/cross_attention": {"embed_dim": 8, "hidden": 16, "num_heads": 2, "num_layers": 1},
                           "decision/stacking": {"cv": 3}},
               train={"max_steps": 30, "batch_size": 32})
    res = R.run(R.load(raw, "cfg"))
    e = res["tasks"]["multiview"]
    assert set(e) == {"unimodal/accel", "unimodal/gene", "data/concat", "feature/cross_attention",
                      "decision/stacking"}
    assert "needs modalities image, depth" in res["skipped"]["multiview"]["data/channel_stack"]
    assert e["decision/stacking"]["accuracy"] > 80.0  # separable classes; fitted through Trainer.fit
    assert res["task_info"]["multiview"]["inputs"]["grid"] == "accel [10, 3], gene [7]"
