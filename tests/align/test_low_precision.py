"""align.llm.low_precision_linears: the frozen LM's matmuls in bf16 — what is swapped, what stays, how close the
loss and gradients stay to float32, and LoRA on top."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from align.connectors import build_connector
from align.llm import LowPrecisionLinear, decoder_layers, low_precision_linears, tiny_llm
from align.mllm import MultimodalLM

WORDS = "a the red blue green circle square star left right of is there what colour yes no".split()
CAPTIONS = ["a red circle", "the blue square is left of a green star", "there is a star", "a green square"]


def _lm():
    return tiny_llm(WORDS, seed=0)


def test_swaps_every_frozen_decoder_linear_and_keeps_the_state_dict():
    llm, _ = _lm()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    n = low_precision_linears(llm)
    assert n == 7 * len(decoder_layers(llm))  # q, k, v, o, gate, up, down per Llama layer
    lows = [m for m in llm.modules() if isinstance(m, LowPrecisionLinear)]
    assert len(lows) == n and all(m.low_weight.dtype == torch.bfloat16 for m in lows)
    assert type(llm.lm_head) is nn.Linear  # the head and the embeddings are not touched
    assert set(llm.state_dict()) == set(before)  # the bf16 copies are not saved
    for k, v in llm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert low_precision_linears(llm) == 0  # idempotent


def test_forward_is_a_bf16_matmul_with_the_input_dtype_kept():
    lin = nn.Linear(16, 8).requires_grad_(False)
    low = LowPrecisionLinear.from_linear(lin)
    x = torch.randn(3, 16)
    y = low(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float())
    assert not torch.equal(y, lin(x))  # it really rounds
    with pytest.raises(ValueError, match="frozen"):
        LowPrecisionLinear.from_linear(nn.Linear(4, 4))


def test_loss_and_connector_gradients_stay_close_to_float32():
    llm, tok = _lm()
    torch.manual_seed(0)
    model = MultimodalLM(llm, tok, build_connector("mlp2x_gelu", 24, 64), prompt="caption:")
    batch = {"image": torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(0)), "text": CAPTIONS}

    def step():
        model.connector.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.connector.parameters()])

    ref_loss, ref_grad = step()
    low_precision_linears(llm)
    loss, grad = step()
    assert float(loss) != float(ref_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=5e-3, atol=0)
    assert float(F.cosine_similarity(grad, ref_grad, dim=0)) > 0.99
    assert all(p.grad is None for p in llm.parameters())


def test_lora_wraps_the_low_precision_layers_and_trains():
    llm, tok = _lm()
    low_precision_linears(llm)
    torch.manual_seed(0)
    model = MultimodalLM(llm, tok, build_connector("linear", 24, 64), prompt="caption:")
    model.add_lora(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    wrapped = [m for n, m in model.llm.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(m.base_layer, LowPrecisionLinear) for m in wrapped)
    batch = {"image": torch.randn(4, 5, 24), "text": CAPTIONS}
    model.loss(batch).backward()
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
