"""Tests of align.connectors: shapes, registry, LLaVA state-dict keys, gradients, gated cross-attention at init."""
from __future__ import annotations

import pytest
import torch

from align.connectors import (CONNECTORS, GatedXAttnConnector, build_connector, connector_config,
                              connector_from_config)
from align.llm import decoder_layers, tiny_llm
from align.mllm import MultimodalLM

D_V, N, B = 24, 6, 3
WORDS = "a the red blue green circle square star left right of is there".split()
CAPTIONS = ["a red circle", "the blue square is left of a green star", "there is a star"]


@pytest.fixture(scope="module")
def lm():
    return tiny_llm(WORDS, seed=0)


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, D_V, generator=torch.Generator().manual_seed(seed))


def test_registry_names_and_errors():
    assert CONNECTORS.names() == ["gated_xattn", "grid_tags", "linear", "mlp2x_gelu", "perceiver", "qformer",
                                  "word_mixture", "word_tags"]
    with pytest.raises(KeyError, match="known connectors: gated_xattn, grid_tags, linear"):
        build_connector("resampler", D_V, 64)
    with pytest.raises(TypeError, match="unknown option.*num_latents"):
        build_connector("qformer", D_V, 64, num_latents=4)


@pytest.mark.parametrize("name,expected_tokens", [("linear", N), ("mlp2x_gelu", N), ("perceiver", 5), ("qformer", 3)])
def test_token_connector_shapes(name, expected_tokens):
    opts = {"perceiver": {"num_latents": 5, "dim": 32}, "qformer": {"num_queries": 3, "dim": 32}}.get(name, {})
    c = build_connector(name, D_V, 64, num_lm_layers=4, **opts)
    assert c.kind == "tokens" and c.name == name
    out = c(_features())
    assert out.shape == (B, expected_tokens, 64)
    assert c.num_tokens(N) == expected_tokens
    assert c(_features()[:, 0]).shape[0] == B  # pooled [B, d_v] is one token
    with pytest.raises(ValueError, match=rf"expects vision features \[B, N, {D_V}\]"):
        c(torch.randn(B, N, D_V + 1))


def test_llava_state_dict_keys():
    assert set(build_connector("mlp2x_gelu", D_V, 64).state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(build_connector("linear", D_V, 64).state_dict()) == {"weight", "bias"}
    mlp = build_connector("mlp2x_gelu", D_V, 64)
    assert tuple(mlp[0].weight.shape) == (64, D_V) and isinstance(mlp[1], torch.nn.GELU)


def test_resampler_rejects_too_many_inputs():
    c = build_connector("perceiver", D_V, 64, dim=32, max_inputs=4)
    with pytest.raises(ValueError, match="at most 4 feature tokens"):
        c(_features())


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "perceiver", "qformer", "gated_xattn"])
def test_gradients_reach_every_connector_parameter_and_no_llm_parameter(lm, name):
    llm, tok = lm
    torch.manual_seed(0)
    opts = {"perceiver": {"dim": 32}, "qformer": {"dim": 32}, "gated_xattn": {"every": 2, "heads": 4}}.get(name, {})
    c = build_connector(name, D_V, 64, num_lm_layers=4, **opts)
    if name == "gated_xattn":  # at init the tanh(0) gates block the gradient of everything but the gates
        with torch.no_grad():
            for b in c.blocks:
                b.attn_gate.fill_(0.5)
                b.ffn_gate.fill_(0.5)
    model = MultimodalLM(llm, tok, c)
    try:
        model.loss({"image": _features(), "text": CAPTIONS}).backward()
        for n, p in c.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}.{n}"
        assert all(p.grad is None and not p.requires_grad for p in llm.parameters())
    finally:
        model.detach()


def test_gated_xattn_gate_gradients_at_init(lm):
    llm, tok = lm
    c = build_connector("gated_xattn", D_V, 64, num_lm_layers=4, every=2, heads=4)
    model = MultimodalLM(llm, tok, c)
    try:
        model.loss({"image": _features(), "text": CAPTIONS}).backward()
        assert all(b.attn_gate.grad.abs().item() > 0 for b in c.blocks)
    finally:
        model.detach()


def test_gated_xattn_is_identity_at_init_and_detach_restores(lm):
    llm, tok = lm
    ids = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        bare = llm(**ids).logits
    c = GatedXAttnConnector(D_V, 64, num_lm_layers=4, every=1, heads=4).attach(llm)
    assert c.layer_ids == [0, 1, 2, 3] and torch.all(c.gates() == 0)
    try:
        with torch.no_grad(), c.conditioned(_features()):
            at_init = llm(**ids).logits
        torch.testing.assert_close(at_init, bare, rtol=0, atol=0)
        with torch.no_grad():
            c.blocks[1].attn_gate.fill_(1.0)
            with c.conditioned(_features()):
                opened = llm(**ids).logits
            unconditioned = llm(**ids).logits  # outside the context the hooks do nothing
        assert not torch.allclose(opened, bare, atol=1e-4)
        torch.testing.assert_close(unconditioned, bare, rtol=0, atol=0)
    finally:
        c.detach()
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(llm))
    with pytest.raises(RuntimeError, match="not attached"):
        with c.conditioned(_features()):
            pass


def test_gated_xattn_checks_depth(lm):
    llm, _ = lm
    with pytest.raises(ValueError, match="built for 6 LM layers, the LM has 4"):
        GatedXAttnConnector(D_V, 64, num_lm_layers=6).attach(llm)


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "perceiver", "qformer", "gated_xattn"])
def test_connector_config_round_trip(name):
    opts = {"perceiver": {"dim": 32, "num_latents": 3, "depth": 1}, "qformer": {"dim": 32, "heads": 2},
            "gated_xattn": {"every": 3, "heads": 4, "ffn_mult": 2}}.get(name, {})
    c = build_connector(name, D_V, 64, num_lm_layers=7, **opts)
    again = connector_from_config(connector_config(c))
    assert type(again) is type(c)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in c.state_dict().items()}
    again.load_state_dict(c.state_dict())


def test_connectors_keep_their_constructor_config():
    import copy

    c = build_connector("perceiver", D_V, 64, dim=32, num_latents=3, depth=1)
    assert c.config == {"name": "perceiver", "vision_dim": D_V, "lm_dim": 64, "num_latents": 3, "dim": 32, "depth": 1,
                        "heads": 4, "ffn_mult": 4, "max_inputs": 256}
    assert copy.deepcopy(c).config == c.config  # copies keep it
    x = GatedXAttnConnector(D_V, 64, num_lm_layers=5, every=2)
    assert x.config["num_lm_layers"] == 5 and x.config["every"] == 2 and x.llava_type is None
    assert build_connector("mlp2x_gelu", D_V, 64).llava_type == "mlp2x_gelu"
