"""The part contract: every registered aligner, fusion strategy and connector builds from dimensions, runs forward,
gets a gradient on every trainable parameter (gradient parts) and survives a save/load round trip; and a part
registered in a test file (one class + one registration line) runs end to end through its runner."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import fusion
from align.base import ALIGNERS, GradientAligner, is_closed_form

pytestmark = pytest.mark.usefixtures("one_thread")

B, D_IMG, D_TXT, P = 6, 12, 10, 16
CAPTIONS = ["a red circle left of a blue square", "a green triangle", "a small yellow star above a circle",
            "two blue squares", "a purple circle right of a red star", "an orange triangle below a square"]
SMALL = {"clip_towers": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32,
                                                           "layers": 1, "head_width": 16},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                      "layers": 1}},
         "gnn": {"embed_dim": 8, "hidden": 16, "layers": 1}, "cca": {"n_components": 3},
         "kernel_cca": {"n_components": 3}}


def _aligner_batch(cls, dims_only: bool = False):
    """(dims, batch, context) for an aligner class's declared inputs."""
    g = torch.Generator().manual_seed(0)
    dims, batch, context = {}, {}, {}
    for key, kind in cls.inputs.items():
        if kind == "vector":
            d = D_IMG if key == "image" else D_TXT
            dims[key], batch[key] = d, torch.randn(B, d, generator=g)
        elif kind == "grid":
            dims[key], batch[key] = D_IMG, torch.randn(B, P, D_IMG, generator=g)
        elif kind == "pixels":
            dims[key], batch[key] = 0, torch.randint(0, 255, (B, 32, 32, 3), dtype=torch.uint8, generator=g)
        elif kind == "raw":
            dims[key], batch[key] = 0, list(CAPTIONS)
        elif kind == "graph":
            from align.graphs import TextGraphBuilder, build_caption_graphs

            graphs = build_caption_graphs(CAPTIONS, TextGraphBuilder(), progress=False)
            dims[key], batch[key] = int(graphs.x.shape[-1]), graphs
        elif kind == "class":
            dims[key], batch[key] = 0, torch.tensor([0, 1, 2, 0, 1, 2])
            context["class_embeddings"] = torch.randn(3, D_TXT, generator=g)
        else:  # pragma: no cover - a new kind must be added here and to experiments.views
            raise AssertionError(f"unknown input kind {kind!r}")
    return dims, batch, context


@pytest.mark.parametrize("name", ALIGNERS.names())
def test_aligner_contract(name, tmp_path):
    cls = ALIGNERS.get(name)
    dims, batch, context = _aligner_batch(cls)
    torch.manual_seed(0)
    model = cls.from_inputs(dims, **context, **SMALL.get(name, {}))
    if is_closed_form(model):
        x, y = (np.asarray(batch[m], dtype=np.float64) for m in model.modalities)
        model.fit(np.concatenate([x] * 4) + np.random.default_rng(0).normal(size=(4 * B, x.shape[1])),
                  np.concatenate([y] * 4) + np.random.default_rng(1).normal(size=(4 * B, y.shape[1])))
        before = {m: model.encode(m, batch[m]) for m in model.modalities}
        again = cls.load(model.save(tmp_path / "m.npz"))
        for m in model.modalities:
            assert before[m].shape[0] == B
            torch.testing.assert_close(again.encode(m, batch[m]), before[m])
        return
    assert isinstance(model, GradientAligner)
    out = model.loss(batch)
    loss = (out["loss"] if "loss" in out else sum(out.values())) if isinstance(out, dict) else out  # Trainer's rule
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or
                                                                            not torch.isfinite(p.grad).all())]
    assert not missing, f"{name}: no (finite) gradient for {missing}"
    model.eval()
    with torch.no_grad():
        emb = {m: model.encode(m, batch[m]) for m in model.modalities}
    assert all(e.shape[0] == B and e.dim() == 2 for e in emb.values())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch.manual_seed(123)
    fresh = cls.from_inputs(dims, **context, **SMALL.get(name, {}))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        for m in model.modalities:
            torch.testing.assert_close(fresh.encode(m, batch[m]), emb[m])


def _fusion_inputs(cls, name: str):
    g = torch.Generator().manual_seed(0)
    kind = getattr(cls, "input_kind", "pooled")
    mods = getattr(cls, "required_modalities", ()) or ("a", "b")
    inputs, dims = {}, {}
    for i, m in enumerate(mods):
        if kind == "pixels":
            shape = (B, 16, 16, 3) if m == "image" else (B, 16, 16)
            inputs[m] = torch.randint(0, 255, shape, dtype=torch.uint8, generator=g)
            dims[m] = 0
        else:
            d = 5 + i
            inputs[m] = torch.randn(B, d, generator=g)
            dims[m] = d
    return dims, inputs


@pytest.mark.parametrize("name", ["unimodal", *fusion.FUSIONS.names()])
def test_fusion_contract(name):
    from experiments.trainer import TrainConfig, Trainer

    cls = fusion.UnimodalClassifier if name == "unimodal" else fusion.FUSIONS.get(name)
    dims, inputs = _fusion_inputs(cls, name)
    if name == "unimodal":
        dims, inputs = {"a": dims["a"]}, {"a": inputs["a"]}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = fusion.build_strategy(cls, dims, 3, seed=0, **({"cv": 2} if "cv" in str(cls.__init__.__code__.co_varnames)
                                                         else {}))
    assert getattr(model, "level", None) in (*fusion.LEVELS, "unimodal")
    if not isinstance(model, nn.Module):  # a scikit-learn combiner: fitted in closed form through the Trainer
        big = {m: torch.cat([x] * 4) + 0.1 * torch.randn(4 * B, x.shape[1]) for m, x in inputs.items()}
        Trainer(TrainConfig(progress=False)).fit(model, {**big, "label": torch.cat([labels] * 4)})
        proba = model.predict_proba(inputs)
        assert proba.shape == (B, 3)
        import joblib  # scikit-learn's own persistence

        buf = io.BytesIO()
        joblib.dump(model, buf)
        buf.seek(0)
        np.testing.assert_allclose(joblib.load(buf).predict_proba(inputs), proba)
        return
    logits = model(inputs)
    assert logits.shape == (B, 3)
    model.loss({**inputs, "label": labels}).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = fusion.build_strategy(cls, dims, 3, seed=1)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(inputs), model(inputs))


def _connector_names() -> list[str]:
    from align.connectors import CONNECTORS

    return CONNECTORS.names()


@pytest.mark.parametrize("name", _connector_names())
def test_connector_contract(name):
    from align.connectors import build_connector

    torch.manual_seed(0)
    conn = build_connector(name, vision_dim=8, lm_dim=16, num_lm_layers=2)
    if hasattr(conn, "bind"):  # a connector over the LM's own word embeddings binds to an LM first
        from align.llm import tiny_llm

        conn.bind(*tiny_llm(["a", "red", "blue", "star"], hidden_size=16, num_layers=1), ["a red star", "a blue star"])
    x = torch.randn(2, 4, 8)
    out = conn(x)
    assert out.shape[0] == 2 and out.shape[-1] in (8, 16)
    cfg = dict(conn.config)
    fresh = build_connector(cfg.pop("name"), **cfg)  # rebuilt from the config it keeps, not from weight shapes
    fresh.load_state_dict(conn.state_dict())
    torch.testing.assert_close(fresh(x), out)
    if getattr(conn, "kind", "tokens") != "tokens":
        return  # cross-attention connectors act inside the LLM (gates start at 0): tested with their LLM
    assert out.shape[-1] == 16
    out.square().mean().backward()
    missing = [n for n, p in conn.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
