"""Tests of align.seeding: closed-form maps, aligner sides, composition, connector seeding, a synthetic bridge."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align.cca import CCA
from align.clip import CLIPHeads
from align.connectors import build_connector
from align.llm import tiny_llm
from align.mllm import MultimodalLM
from align.seeding import (AffineMap, aligner_map, caption_vocabulary, fit_map, fit_text_to_lm, image_to_lm_map,
                           llm_text_embeddings, map_r2, seed_connector)


def _planted(n=400, k=6, d=10, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    w, b = rng.normal(size=(k, d)), rng.normal(size=d)
    return x, x @ w + b + noise * rng.normal(size=(n, d)), w, b


def test_lstsq_recovers_a_planted_affine_map():
    x, y, w, b = _planted()
    m = fit_map(x, y, "lstsq")
    np.testing.assert_allclose(m.weight, w, atol=5e-3)
    np.testing.assert_allclose(m.bias, b, atol=5e-3)
    assert map_r2(m, x, y) > 0.9999


def test_procrustes_recovers_a_planted_scaled_orthogonal_map():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(10, 6)))  # [10, 6] orthonormal columns
    rot, scale, bias = q.T, 2.5, rng.normal(size=10)  # [6, 10] orthonormal rows
    x = rng.normal(size=(300, 6)) + 3.0
    y = scale * x @ rot + bias + 1e-3 * rng.normal(size=(300, 10))
    m = fit_map(x, y, "procrustes")
    np.testing.assert_allclose(m.weight, scale * rot, atol=1e-3)
    np.testing.assert_allclose(m.bias, bias, atol=1e-2)
    # an orthogonal map cannot fit a general linear map as well as least squares does
    x2, y2, _, _ = _planted(seed=2)
    assert map_r2(fit_map(x2, y2, "procrustes"), x2, y2) < map_r2(fit_map(x2, y2, "lstsq"), x2, y2)
    with pytest.raises(ValueError, match="k > d"):
        fit_map(rng.normal(size=(20, 8)), rng.normal(size=(20, 4)), "procrustes")
    with pytest.raises(ValueError, match="method must be one of"):
        fit_map(x, y, "svd")


def test_affine_map_composition_and_checks():
    rng = np.random.default_rng(0)
    f = AffineMap(rng.normal(size=(5, 4)), rng.normal(size=4))
    g = AffineMap(rng.normal(size=(4, 3)), rng.normal(size=3))
    x = rng.normal(size=(7, 5))
    np.testing.assert_allclose(f.then(g)(x), g(f(x)))
    np.testing.assert_allclose(f(torch.tensor(x)), f(x))
    with pytest.raises(ValueError, match="cannot compose"):
        g.then(f)
    with pytest.raises(ValueError, match=r"expects inputs \[..., 5\]"):
        f(x[:, :3])


def test_aligner_maps_equal_the_aligners_encoders():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(200, 12)), rng.normal(size=(200, 7))
    cca = CCA(3, reg=0.1).fit(X, Y)
    np.testing.assert_allclose(aligner_map(cca, "image")(X), cca.encode("image", X).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aligner_map(cca, "text")(Y), cca.encode("text", Y).numpy(), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    clip = CLIPHeads(12, 7, embed_dim=5)
    xi = torch.tensor(X[:10], dtype=torch.float32)
    unnormalised = aligner_map(clip, "image")(xi)
    np.testing.assert_allclose(unnormalised / np.linalg.norm(unnormalised, axis=1, keepdims=True),
                               clip.encode("image", xi).detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="head='linear'"):
        aligner_map(CLIPHeads(12, 7, embed_dim=5, head="mlp"), "image")


def test_vocabulary_and_llm_text_embeddings():
    assert caption_vocabulary(["A red circle; the red star.", "a Disc"]) == ["a", "circle", "disc", "red", "star",
                                                                            "the"]
    assert caption_vocabulary(["a red", "a blue"], min_count=2) == ["a"]
    llm, tok = tiny_llm(["red", "circle"], seed=0)
    e = llm.get_input_embeddings().weight.double()
    out = llm_text_embeddings(llm, tok, ["red circle", "red"])
    r, c = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("circle")
    np.testing.assert_allclose(out[0], ((e[r] + e[c]) / 2).numpy())
    np.testing.assert_allclose(out[1], e[r].numpy())


def _seed_map(d_v=16, d_lm=64, k=4, seed=0):
    rng = np.random.default_rng(seed)
    to_shared = AffineMap(rng.normal(size=(d_v, k)) * 0.3, rng.normal(size=k) * 0.1)
    to_lm = to_shared.then(AffineMap(rng.normal(size=(k, d_lm)) * 0.2, rng.normal(size=d_lm) * 0.05))
    feats = torch.tensor(rng.normal(size=(32, 5, d_v)), dtype=torch.float32)
    return to_shared, to_lm, feats


def test_seeded_projectors_compute_the_composed_map():
    to_shared, to_lm, feats = _seed_map()
    lin = build_connector("linear", 16, 64)
    seed_connector(lin, to_lm)
    np.testing.assert_allclose(lin(feats).detach().numpy(), to_lm(feats), atol=1e-5)
    mlp = build_connector("mlp2x_gelu", 16, 64)
    info = seed_connector(mlp, to_lm, features=feats, mlp_mode="shift")
    assert info["mlp_shift"] > 4.0
    out = mlp(feats).detach().double().numpy()
    target = to_lm(feats)
    assert np.abs(out - target).max() < 2e-3 * (np.abs(target).max() + info["mlp_shift"])
    ident = build_connector("mlp2x_gelu", 16, 64)
    seed_connector(ident, to_lm, mlp_mode="identity")
    assert np.abs(ident(feats).detach().numpy() - target).max() > 0.05  # GELU clips the negative half
    with pytest.raises(ValueError, match="seed map is 16 → 64, connector is 16 → 32"):
        seed_connector(build_connector("linear", 16, 32), to_lm)


@pytest.mark.parametrize("name", ["perceiver", "qformer"])
def test_seeded_resamplers_approximate_the_pooled_map(name):
    to_shared, to_lm, feats = _seed_map()
    torch.manual_seed(0)
    seeded = build_connector(name, 16, 64, dim=32)
    info = seed_connector(seeded, to_lm, image_to_shared=to_shared, features=feats)
    torch.manual_seed(0)
    random = build_connector(name, 16, 64, dim=32)
    target = to_lm(feats.double().mean(1))[:, None]
    err = lambda c: float(((c(feats).detach().double().numpy() - target) ** 2).mean())  # noqa: E731
    assert info["out_proj_r2"] > 0.5
    assert err(seeded) < 0.5 * err(random)
    torch.testing.assert_close(seeded.in_proj.weight[:4].double(), torch.tensor(to_shared.weight.T))
    with pytest.raises(ValueError, match="needs image_to_shared"):
        seed_connector(build_connector(name, 16, 64, dim=32), to_lm)


@pytest.mark.parametrize("name", ["perceiver", "qformer"])
def test_resampler_blocks_random_seeds_only_the_projections(name):
    to_shared, to_lm, feats = _seed_map()
    torch.manual_seed(0)
    seeded = build_connector(name, 16, 64, dim=32)
    torch.manual_seed(0)
    random = build_connector(name, 16, 64, dim=32)
    info = seed_connector(seeded, to_lm, image_to_shared=to_shared, features=feats, resampler_blocks="random")
    for (key, a), (_, b) in zip(seeded.layers.state_dict().items(), random.layers.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)  # the blocks keep their random init
    torch.testing.assert_close(seeded.in_proj.weight[:4].double(), torch.tensor(to_shared.weight.T))
    assert not torch.equal(seeded.out_proj.weight, random.out_proj.weight) and 0.0 < info["out_proj_r2"] <= 1.0
    with pytest.raises(ValueError, match="resampler_blocks must be one of"):
        seed_connector(build_connector(name, 16, 64, dim=32), to_lm, image_to_shared=to_shared, features=feats,
                       resampler_blocks="frozen")


def test_seeded_gated_xattn_keeps_the_lm_unchanged():
    to_shared, to_lm, feats = _seed_map()
    c = build_connector("gated_xattn", 16, 64, num_lm_layers=4, every=2, heads=4)
    info = seed_connector(c, to_lm, features=feats)
    assert torch.all(c.gates() == 0) and "v_proj_r2" in info
    torch.testing.assert_close(c.blocks[0].attn.out_proj.weight, torch.eye(64))


def test_seeded_connector_beats_random_at_step_0_on_a_synthetic_bridge():
    """An honest miniature of the bridge.

    A tiny LM learns (from text only) to repeat the first token after "caption:". Images and texts are
    noisy views of one of six colours; CCA aligns them; the shared → LLM map is fitted on text only
    (text features → LLM embeddings of the colour words). The composed image map, never trained on
    the LM, puts each image's colour word into the LM: the caption NLL at step 0 is far below random init's.
    """
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    llm, tok = tiny_llm(colours, hidden_size=32, num_layers=1, seed=0)
    llm.requires_grad_(True).train()
    ids = torch.tensor(tok.convert_tokens_to_ids(colours))
    prompt = torch.tensor(tok("caption:", add_special_tokens=False)["input_ids"])
    opt = torch.optim.Adam(llm.parameters(), 3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        w = ids[torch.randint(0, 6, (32,), generator=g)][:, None]
        seq = torch.cat([w, prompt.expand(32, -1), w, torch.full((32, 1), tok.eos_token_id)], 1)
        labels = seq.masked_fill(torch.arange(seq.shape[1]) <= len(prompt), -100)
        loss = llm(seq, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    llm.requires_grad_(False).eval()
    assert loss.item() < 0.05

    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, 300)
    X = rng.normal(size=(6, 20))[label] + 0.3 * rng.normal(size=(300, 20))  # "image features"
    T = rng.normal(size=(6, 12))[label] + 0.3 * rng.normal(size=(300, 12))  # "text features" of the captions
    captions = [colours[i] for i in label]
    cca = CCA(5, reg=1e-3).fit(X, T)
    to_lm = image_to_lm_map(cca, fit_text_to_lm(cca, T, llm_text_embeddings(llm, tok, captions)))
    feats = torch.tensor(X[:, None], dtype=torch.float32)
    nll = {}
    for init in ("seeded", "random"):
        torch.manual_seed(0)
        c = build_connector("linear", 20, 32)
        if init == "seeded":
            seed_connector(c, to_lm)
        with torch.no_grad():
            nll[init] = float(MultimodalLM(llm, tok, c, prompt="caption:").caption_nll(
                {"image": feats, "text": captions}).mean())
    assert nll["seeded"] < 0.2 < 1.0 < nll["random"], nll
