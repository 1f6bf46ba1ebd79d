"""The bridge's ``stage1`` init (BLIP-2's first stage: a Q-Former aligner trained on the run's image tokens and
captions, its query path + a new projection as the ``qformer`` connector): config checks, an end-to-end run with the
tiny Llama beside ``seeded`` and ``random``, the report's stage-1 comparison, and the saved model's round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiments.config import ConfigError
from experiments.runners import bridge

pytestmark = pytest.mark.usefixtures("one_thread")

#: a Q-Former small enough for CPU tests: random init (not MiniLM), hidden 32, one layer
STAGE1 = {"steps": 3, "negatives_per_image": 2, "train": {"batch_size": 8},
          "options": {"init": "random", "hidden": 32, "heads": 2, "ffn_dim": 64, "num_layers": 1, "embed_dim": 16}}
TINY = {"data": {"n_scenes": 40, "image_size": 64}, "vision": {"tokens": 4},
        "llm": {"name_or_path": "tiny", "max_caption_tokens": 12, "prompt": "Caption:"},
        "seeding": {"n_components": 4, "scales": [1.0, 2.0], "n_calibration_captions": 4},
        "method": {"style_tokens": 2},
        "connector_options": {"qformer": {"num_queries": 3, "dim": 32, "depth": 1, "heads": 4}},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 1, "log_every": 1, "progress": False},
        "eval": {"n_eval_images": 4, "captions_per_image": 1, "max_new_tokens": 3, "n_val_captions": 4,
                 "n_examples": 4},
        "stage1": STAGE1}


def test_stage1_config_defaults_and_errors():
    from experiments.bridge.stages import connector_inits

    cfg = bridge.load({}, "bridge.yaml")
    assert cfg.inits == ["seeded", "random"] and cfg.stage1.steps > 0 and not cfg.stage1.freeze_qformer
    assert connector_inits("qformer") == ("seeded", "random", "stage1")
    assert connector_inits("mlp2x_gelu") == connector_inits("word_mixture") == ("seeded", "random")
    ok = bridge.load({"connectors": ["linear", "qformer"], "inits": ["random", "stage1"],
                      "stage2": {"connector": "qformer", "inits": ["stage1"]}})
    assert ok.inits == ["random", "stage1"] and ok.stage2.inits == ["stage1"]
    with pytest.raises(ConfigError, match=r"bridge.yaml: inits: 'stage1' applies to none of connectors "
                                          r"\['mlp2x_gelu', 'linear'\] \(it applies to: qformer\)"):
        bridge.load({"connectors": ["mlp2x_gelu", "linear"], "inits": ["seeded", "stage1"]}, "bridge.yaml")
    with pytest.raises(ConfigError, match=r"stage2.inits: \['stage1'\] do not apply to the stage-2 connector 'linear'"):
        bridge.load({"connectors": ["linear", "qformer"], "inits": ["stage1"], "stage2": {"inits": ["stage1"]}})
    assert not bridge.load({"connectors": ["linear", "qformer"], "inits": ["stage1"],
                            "stage2": {"inits": ["stage1"], "enabled": False}}).stage2.enabled
    with pytest.raises(ConfigError, match="stage1.options.num_querys; valid keys of .*num_queries"):
        bridge.load({"connectors": ["qformer"], "inits": ["stage1"], "stage1": {"options": {"num_querys": 4}}})
    with pytest.raises(ConfigError, match="stage1.train.momentum; valid keys of stage1.train: batch_size"):
        bridge.load({"connectors": ["qformer"], "inits": ["stage1"], "stage1": {"train": {"momentum": 0.9}}})
    with pytest.raises(ConfigError, match="stage1.steps"):
        bridge.load({"stage1": {"steps": 0}})
    with pytest.raises(ConfigError, match="inits.0"):
        bridge.load({"inits": ["stage2"]})


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge_stage1")
    raw = {**TINY, "connectors": ["qformer", "linear"], "inits": ["seeded", "random", "stage1"],
           "stage2": {"connector": "qformer", "inits": ["stage1"], "n_eval_scenes": 4,
                      "train": {"max_steps": 1, "batch_size": 4, "progress": False}},
           "out_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache")}
    cfg = bridge.load(raw)
    return cfg, bridge.run(cfg), tmp


def test_run_with_the_stage1_init(stage1_run):
    cfg, results, tmp = stage1_run
    assert list(results["runs"]) == ["qformer/seeded", "qformer/random", "qformer/stage1", "linear/seeded",
                                     "linear/random"]
    assert results["skipped"] == [{"run": "linear/stage1", "reason": "connector 'linear' has no 'stage1' init "
                                                                     "(it supports seeded, random)"}]
    st, rnd = results["runs"]["qformer/stage1"], results["runs"]["qformer/random"]
    assert st["steps"] == rnd["steps"] == 4 and [s for s, _ in st["curves"]["val_caption_nll"]] == [0, 1, 2, 3, 4]
    info = st["seed_info"]
    assert info["steps"] == 3 and not info["loaded"] and info["options"]["num_queries"] == 3  # the connector's
    assert (tmp / "cache" / "qformer_stage1" / f"qformer-stage1-{info['key']}.pt").is_file()
    assert st["n_trainable"] != rnd["n_trainable"]  # a different architecture (the aligner's Q-Former)
    assert np.isfinite(st["caption_nll"]) and st["caption_nll_step0"] != rnd["caption_nll_step0"]
    # the comparison: first val step at which stage1 reaches random's final val NLL, gains among qformer rows
    c = results["comparisons"]["qformer"]["stage1"]
    curve, level = st["curves"]["val_caption_nll"], rnd["val_caption_nll"]
    reach = next((s for s, v in curve if v <= level), None)
    assert c["stage1_steps_to_reach_random_final"] == reach and c["random_final_val_nll"] == level
    assert c["within_a_third"] == (reach is not None and reach <= 4 / 3)
    gains = {i: results["runs"][f"qformer/{i}"]["gain_vs_shuffled"]["gain"] for i in ("seeded", "random", "stage1")}
    assert {i: g["gain"] for i, g in c["image_gain_vs_shuffled"].items()} == gains
    assert c["largest_image_gain"] == max(gains, key=gains.get)
    assert "stage1" not in results["comparisons"]["linear"]
    table = bridge.format_results(results)
    assert table.count("\n| qformer/stage1 | ") == 1 and "stage1 steps to reach it" in table
    assert "Not run (the init does not apply): `linear/stage1`" in table
    assert results["vqa"]["runs"].keys() == {"stage1"} and results["vqa"]["connector"] == "qformer"
    assert json.loads((tmp / "out" / "results.json").read_text())["comparisons"]["qformer"]["stage1"] == c


def test_saved_stage1_model_round_trip(stage1_run):
    from align.qformer_aligner import QFormerConnector
    from experiments.ask import load_bridge
    from experiments.bridge.evaluate import corpus_nll
    from experiments.bridge.features import prepare

    cfg, results, tmp = stage1_run
    unit = tmp / "out" / "runs" / "qformer-stage1" / "model"
    meta = json.loads((unit / "bridge.json").read_text())
    assert meta["connector"]["name"] == "qformer_blip2" and meta["init"] == "stage1"
    model = load_bridge(unit)
    assert isinstance(model.connector, QFormerConnector) and model.connector.qformer.num_queries == 3
    bd = prepare(cfg)  # the run's held-out captions; raw images through the loaded model's vision tower
    ev = bd.eval_set
    nll = corpus_nll(model, bd.data.images[ev["indices"]], ev["caption_rows"], ev["captions"], "image", 4)
    assert nll == pytest.approx(results["runs"]["qformer/stage1"]["caption_nll"], rel=1e-4)
    staged = load_bridge(tmp / "out")  # the stage-2 model (LoRA adapter) of the stage1 init
    assert isinstance(staged.connector, QFormerConnector) and staged._peft is not None
    answers = staged.chat(bd.data.images[:2], "What colour is the star?", max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_stage1_connector_contract():
    """What tests/test_contract.py checks of registered connectors, for the stage-1 connector (built from a trained
    aligner, so not in CONNECTORS): forward shape, a gradient on every trainable parameter, a rebuild from the config
    it keeps (JSON, as bridge.json stores it) with equal outputs, and :func:`saved_connector` dispatch."""
    from align.qformer_aligner import QFormerAligner, qformer_connector
    from experiments.qformer_bridge import saved_connector

    torch.manual_seed(0)
    aligner = QFormerAligner(image_dim=8, **{**STAGE1["options"], "num_queries": 3})
    conn = qformer_connector(aligner, lm_dim=16)
    x = torch.randn(2, 4, 8)
    out = conn(x)
    assert out.shape == (2, 3, 16) and conn.num_tokens(4) == 3
    out.square().mean().backward()
    missing = [n for n, p in conn.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    rebuilt = saved_connector(json.loads(json.dumps(conn.config)))
    rebuilt.load_state_dict(conn.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), conn.eval()(x))
    assert saved_connector({"name": "linear", "vision_dim": 8, "lm_dim": 16}) is None
    frozen = qformer_connector(aligner, lm_dim=16, freeze_qformer=True)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
