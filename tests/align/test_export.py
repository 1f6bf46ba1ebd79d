"""Tests of align.export and the export-projector CLI: LLaVA keys/shapes, round trips, transformers' Llava projector."""
from __future__ import annotations

import json

import pytest
import torch

from align.connectors import build_connector
from align.export import (export_hf_projector, export_llava_projector, hf_state_dict, load_hf_projector,
                          load_llava_projector, llava_state_dict)

D_V, D_LM = 40, 24


def _mlp(seed=0):
    torch.manual_seed(seed)
    return build_connector("mlp2x_gelu", D_V, D_LM)


def test_llava_keys_and_shapes():
    sd = llava_state_dict(_mlp())
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "model.mm_projector.0.weight": (D_LM, D_V), "model.mm_projector.0.bias": (D_LM,),
        "model.mm_projector.2.weight": (D_LM, D_LM), "model.mm_projector.2.bias": (D_LM,)}
    lin = llava_state_dict(build_connector("linear", D_V, D_LM))
    assert {k: tuple(v.shape) for k, v in lin.items()} == {"model.mm_projector.weight": (D_LM, D_V),
                                                          "model.mm_projector.bias": (D_LM,)}
    with pytest.raises(ValueError, match="only 'linear' and 'mlp2x_gelu'"):
        llava_state_dict(build_connector("perceiver", D_V, D_LM, dim=16))


@pytest.mark.parametrize("name", ["mlp2x_gelu", "linear"])
def test_llava_round_trip(tmp_path, name):
    torch.manual_seed(1)
    c = build_connector(name, D_V, D_LM)
    path = export_llava_projector(c, tmp_path, vision_encoder="mobilenet_v2-imagenet-128px", llm="smollm2",
                                  extra={"init": "seeded"})
    assert path.name == "mm_projector.bin" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mm_projector.bin", "mm_projector_config.json"]  # no temporary files left behind
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("model.mm_projector.") for k in raw)
    cfg = json.loads((tmp_path / "mm_projector_config.json").read_text())
    assert cfg["mm_projector_type"] == name and cfg["mm_hidden_size"] == D_V and cfg["hidden_size"] == D_LM
    assert cfg["mm_vision_tower"] == "mobilenet_v2-imagenet-128px" and cfg["llm"] == "smollm2"
    again = load_llava_projector(tmp_path)
    x = torch.randn(2, 3, D_V)
    torch.testing.assert_close(again(x), c(x), rtol=0, atol=0)
    assert type(again) is type(c)


def test_llava_loader_rejects_foreign_files(tmp_path):
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2)}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="neither LLaVA's linear nor its mlp2x_gelu"):
        load_llava_projector(tmp_path / "mm_projector.bin")
    torch.save({"mm_projector.weight": torch.zeros(2, 2)}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="must start with 'model.mm_projector.'"):
        load_llava_projector(tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError):
        load_llava_projector(tmp_path / "missing")


def test_hf_projector_matches_transformers_llava(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    c = _mlp(2)
    path = export_hf_projector(c, tmp_path, vision_encoder="mobilenet_v2", llm="smollm2")
    state = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "multi_modal_projector.linear_1.weight": (D_LM, D_V), "multi_modal_projector.linear_1.bias": (D_LM,),
        "multi_modal_projector.linear_2.weight": (D_LM, D_LM), "multi_modal_projector.linear_2.bias": (D_LM,)}
    cfg = json.loads((tmp_path / "multi_modal_projector_config.json").read_text())
    config = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=cfg["vision_config"]["hidden_size"],
                                                          num_attention_heads=4),
                         text_config=LlamaConfig(hidden_size=cfg["text_config"]["hidden_size"], num_attention_heads=4),
                         projector_hidden_act=cfg["projector_hidden_act"], vision_feature_layer=-1,
                         multimodal_projector_bias=cfg["multimodal_projector_bias"])
    hf = LlavaMultiModalProjector(config)
    prefix = "multi_modal_projector."
    hf.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
    x = torch.randn(3, 5, D_V)
    torch.testing.assert_close(hf(x), c(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(load_hf_projector(tmp_path)(x), c(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="export a 'mlp2x_gelu'"):
        hf_state_dict(build_connector("linear", D_V, D_LM))


def test_cli_exports_from_trainer_and_runner_checkpoints(tmp_path, capsys):
    from experiments.checkpoint import save_checkpoint
    from experiments.cli import main

    c = _mlp(3)
    trainer_ckpt = tmp_path / "best.pt"
    save_checkpoint({"format": 1, "kind": "best", "step": 7,
                     "model": {f"connector.{k}": v for k, v in c.state_dict().items()}}, trainer_ckpt)
    assert main(["export-projector", "--checkpoint", str(trainer_ckpt), "--format", "llava",
                 "--out", str(tmp_path / "llava"), "--llm", "smollm2"]) == 0
    x = torch.randn(2, 4, D_V)
    torch.testing.assert_close(load_llava_projector(tmp_path / "llava")(x), c(x), rtol=0, atol=0)
    sidecar = json.loads((tmp_path / "llava" / "mm_projector_config.json").read_text())
    assert sidecar["trainer_step"] == 7 and sidecar["llm"] == "smollm2"

    runner_ckpt = tmp_path / "connector.pt"
    save_checkpoint({"connector_config": {"name": "mlp2x_gelu", "vision_dim": D_V, "lm_dim": D_LM},
                     "state_dict": c.state_dict(), "llm": "smollm2", "vision_encoder": "mnv2"}, runner_ckpt)
    assert main(["export-projector", "--checkpoint", str(runner_ckpt), "--format", "hf",
                 "--out", str(tmp_path / "hf")]) == 0
    torch.testing.assert_close(load_hf_projector(tmp_path / "hf")(x), c(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "hf" / "multi_modal_projector_config.json").read_text())["mm_vision_tower"] == "mnv2"

    torch.save({"connector.latents": torch.zeros(2)}, tmp_path / "bad.pt")
    assert main(["export-projector", "--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "not a linear or mlp2x_gelu projector" in capsys.readouterr().err
