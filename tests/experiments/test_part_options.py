"""``alignfuse run CONFIG --dry-run`` checks part option *values* and types, not only names: each selected
aligner, fusion strategy and connector is built from dummy dimensions on the meta device at validation, so a bad
value fails naming its config key before any data, feature or weight loads; valid options (every registered part
with its defaults, every bundled config) pass."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import yaml

import fusion
from align.base import ALIGNERS
from experiments.cli import main
from experiments.config import ConfigError
from experiments.part_options import (check_aligner_options, check_connector_options, check_fusion_options,
                                      dry_build)


def _dry_run(tmp_path, capsys, cfg: dict) -> tuple[int, str]:
    """``alignfuse run --dry-run`` on ``cfg`` (with an empty cache dir that must stay empty)."""
    path = tmp_path / "cfg.yaml"
    cache = tmp_path / "cache"
    cache.mkdir()
    path.write_text(yaml.safe_dump({**cfg, "cache_dir": str(cache), "out_dir": str(tmp_path / "out")}))
    rc = main(["run", "--dry-run", str(path)])
    assert not any(cache.iterdir()) and not (tmp_path / "out").exists()  # nothing loaded, nothing written
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"n_components": -1}, r"aligners\.cca: n_components must be a positive int, got -1"),
    ({"n_components": "abc"}, r"aligners\.cca\.n_components: Input should be a valid integer"),
    ({"n_components": 4, "whiten": True}, r"unknown key aligners\.cca\.whiten; valid keys of aligners\.cca: "
                                          r"n_components, reg"),
    ({"reg": -1.0}, r"aligners\.cca: reg_x must be a finite number >= 0, got -1\.0"),
])
def test_dry_run_rejects_bad_aligner_options_naming_the_key(tmp_path, capsys, options, message):
    rc, err = _dry_run(tmp_path, capsys, {"experiment": "align", "aligners": {"cca": options}})
    assert rc == 2 and err.startswith("alignfuse run: error: ") and "cfg.yaml" in err
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("name, options, message", [
    ("cycle_ae", {"alignment": "cosine"}, r"aligners\.cycle_ae: alignment must be 'infonce' or 'mse'"),
    ("clip", {"embed_dim": 2.5}, r"aligners\.clip\.embed_dim: .*fractional part"),
    ("clip", {"embed_dim": -8}, r"aligners\.clip: .*negative dimension"),
    ("qformer", {"init": "bert"}, r"aligners\.qformer: init must be 'minilm' or 'random'"),
])
def test_aligner_values_and_types_fail_at_validation(name, options, message):
    with pytest.raises(ConfigError, match=message):
        check_aligner_options(name, options, f"aligners.{name}", source="my.yaml")


@pytest.mark.parametrize("strategy, options, message", [
    ("feature/lmf", {"rank": 0}, r"strategies\.feature/lmf: rank must be >= 1, got 0"),
    ("feature/concat", {"hidden": "wide"}, r"strategies\.feature/concat\.hidden: Input should be a valid integer"),
    ("feature/cross_attention", {"embed_dim": 10, "num_heads": 3}, r"embed_dim \(10\) must be divisible by "
                                                                   r"num_heads \(3\)"),
    ("decision/stacking", {"final_estimator": {"C": -1}}, r"strategies\.decision/stacking\.final_estimator: The "
                                                          r"'C' parameter of LogisticRegression"),
    ("data/channel_stack", {"backbone": "resnet"}, r"backbone must be one of"),
    ("unimodal", {"embed_dim": -3}, r"strategies\.unimodal: .*negative dimension"),
])
def test_dry_run_rejects_bad_fusion_options_naming_the_key(tmp_path, capsys, strategy, options, message):
    rc, err = _dry_run(tmp_path, capsys, {"experiment": "fusion", "strategies": {strategy: options}})
    assert rc == 2 and __import__("re").search(message, err), err


@pytest.mark.parametrize("connectors, options, message", [
    (["gated_xattn"], {"gated_xattn": {"every": 0}}, r"connector_options\.gated_xattn: gated_xattn needs every >= 1"),
    (["perceiver"], {"perceiver": {"num_latents": "many"}}, r"connector_options\.perceiver\.num_latents: Input "
                                                            r"should be a valid integer"),
    (["perceiver"], {"perceiver": {"heads": 7, "dim": 64}}, r"connector_options\.perceiver"),
    (["linear"], {"linear": {"bias": False}}, r"unknown key connector_options\.linear\.bias"),
])
def test_dry_run_rejects_bad_connector_options_naming_the_key(tmp_path, capsys, connectors, options, message):
    rc, err = _dry_run(tmp_path, capsys, {"experiment": "bridge", "connectors": connectors,
                                           "connector_options": options})
    assert rc == 2 and __import__("re").search(message, err), err


def test_every_registered_part_passes_with_its_defaults():
    for name in ALIGNERS.names():
        check_aligner_options(name, {}, f"aligners.{name}")
    for name in fusion.FUSIONS.names():
        check_fusion_options(fusion.FUSIONS.get(name), {}, f"strategies.{name}")
    check_fusion_options(fusion.UnimodalClassifier, {}, "strategies.unimodal", modalities=("view_a",))
    from align.connectors import CONNECTORS

    for name in CONNECTORS.names():
        check_connector_options(name, {}, f"connector_options.{name}")


@pytest.mark.parametrize("config", ["align_shapesworld", "fusion_shapesworld", "bridge_shapesworld",
                                    "qformer_ablation"])
def test_bundled_configs_still_pass_the_dry_run(config, capsys):
    assert main(["run", "--dry-run", config]) == 0, capsys.readouterr().err


def test_the_dry_build_leaves_rngs_devices_and_network_as_they_were():
    import socket

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    getaddrinfo = socket.getaddrinfo
    with dry_build():
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
        assert torch.zeros(1).device.type == "meta"
        with pytest.raises(OSError):
            socket.getaddrinfo("example.org", 80)
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert socket.getaddrinfo is getaddrinfo and torch.zeros(1).device.type == "cpu"
