"""``alignfuse bench bridge``: the bridge's training step against a plain transformers forward + backward.

Both compute the caption loss of the same batch (ShapesWorld-like captions, random vision features
``[B, N, d_v]``) through the same frozen LM and the same ``mlp2x_gelu`` connector, then backpropagate
into the connector:

* ``plain``: ``llm(inputs_embeds, attention_mask, labels=...)`` — logits over the whole vocabulary
  at every position (what a transformers training loop does);
* ``ours``: :meth:`align.mllm.MultimodalLM.loss` — decoder hidden states, LM head on the labelled
  positions only; variants with the frozen attention/MLP matmuls in bf16
  (:func:`align.llm.low_precision_linears`, config ``llm.linears_bf16``), the LM head in bf16, a short
  prompt instead of ChatML, and ``--tokens`` image tokens (the grid average-pooled) instead of N.

Variants are timed interleaved (round robin) in one process, so machine load hits them alike; the
table gives the median step time, the ratio to ``plain`` and the loss (must equal plain's to 1e-3
for the same sequence layout; the bf16 variants move it by rounding, and the table prints by how much).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)

HELP = "bridge training step (LM head on caption positions only) vs a plain transformers forward+backward"
CAPTIONS = ["a huge green disc in front of a tangerine star", "closest to the viewer is a big green disc",
            "a large emerald disc in the top left corner", "a tangerine star above a big red rhombus",
            "a picture of a huge orange star, a huge green disc and a red rhombus", "a small blue square",
            "there is a yellow triangle; to its left sits a purple cross", "two objects: a red star and a cross"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", default="smollm2", help="the causal LM (smollm2, a directory, or 'tiny')")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grid", type=int, default=16, help="vision feature tokens N per image")
    parser.add_argument("--tokens", type=int, default=4, help="image tokens of the pooled variant")
    parser.add_argument("--vision-dim", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def _pool(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Average-pool a square grid ``[B, N, d]`` to ``tokens`` (a square number) tokens."""
    from experiments.bridge.features import pool_grid

    return torch.from_numpy(pool_grid(x.numpy(), tokens))


def run(args: argparse.Namespace) -> dict:
    import copy

    from align.connectors import build_connector
    from align.llm import load_llm, low_precision_linears, tiny_llm
    from align.mllm import MultimodalLM
    from experiments.bridge.config import CHATML_PROMPT, SHORT_PROMPT

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llm == "tiny":
        llm, tok = tiny_llm(" ".join(CAPTIONS).replace(",", " ").replace(";", " ").split() + ["describe", "image"])
    else:
        llm, tok = load_llm(args.llm)
    d_lm = llm.get_input_embeddings().embedding_dim
    torch.manual_seed(0)
    caps = (CAPTIONS * (args.batch_size // len(CAPTIONS) + 1))[: args.batch_size]
    feats = torch.randn(args.batch_size, args.grid, args.vision_dim)
    connector = build_connector("mlp2x_gelu", args.vision_dim, d_lm)

    low_llm = copy.deepcopy(llm)
    low_precision_linears(low_llm)

    def model(prompt: str, lm: torch.nn.Module = llm, **kw) -> MultimodalLM:
        return MultimodalLM(lm, tok, connector, prompt=prompt, max_caption_tokens=40, **kw)

    chat, short = model(CHATML_PROMPT), model(SHORT_PROMPT)
    bf16 = model(CHATML_PROMPT, head_dtype=torch.bfloat16)
    pooled = _pool(feats, args.tokens)
    batch = {"image": feats, "text": caps}
    variants = {
        "plain (transformers, ChatML prompt)": (chat.plain_loss, batch),
        "ours: head on caption positions": (chat.loss, batch),
        "ours + bf16 LM head": (bf16.loss, batch),
        "ours + bf16 linears": (model(CHATML_PROMPT, low_llm).loss, batch),
        "ours + bf16 linears + bf16 head": (model(CHATML_PROMPT, low_llm, head_dtype=torch.bfloat16).loss, batch),
        "ours + short prompt": (short.loss, batch),
        f"ours + short prompt + {args.tokens} image tokens": (short.loss, {"image": pooled, "text": caps}),
        f"ours + short prompt + {args.tokens} tokens + bf16 head": (
            model(SHORT_PROMPT, head_dtype=torch.bfloat16).loss, {"image": pooled, "text": caps}),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats + 1):
        for name, (fn, b) in variants.items():
            connector.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = fn(b)
            loss.backward()
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            losses[name] = float(loss.detach())
            grads[name] = torch.cat([p.grad.flatten() for p in connector.parameters()])
    first = next(iter(variants))
    plain = statistics.median(times[first])
    rows = []
    for name in variants:
        med = statistics.median(times[name])
        g = None if "short prompt" in name else grads[name] - grads[first]  # other layouts: another loss
        rows.append({"variant": name, "step_seconds": round(med, 4), "speedup_vs_plain": round(plain / med, 2),
                     "loss": round(losses[name], 5),
                     "grad_rel_diff": None if g is None else float(g.norm() / grads[first].norm())})
    print(f"bridge step: {args.llm}, batch {args.batch_size}, {args.grid} grid tokens, mlp2x_gelu; median of "
          f"{args.repeats} interleaved steps (forward + backward into the connector)")
    print("(- plain: loss minus plain's; grad: |connector gradient - plain's| / |plain's|, for the same layout)")
    print(f"{'variant':<52} {'step s':>8} {'x plain':>8} {'loss':>9} {'- plain':>9} {'grad':>7}")
    for r in rows:
        same = r["grad_rel_diff"] is not None
        diff = f"{r['loss'] - rows[0]['loss']:>+9.4f}" if same else f"{'':>9}"
        grad = f"{r['grad_rel_diff']:.3f}" if same else ""
        print(f"{r['variant']:<52} {r['step_seconds']:>8.3f} {r['speedup_vs_plain']:>8.2f} {r['loss']:>9.4f} "
              f"{diff} {grad:>7}")
    first, second = rows[0]["loss"], rows[1]["loss"]
    print(f"loss ours - plain (same layout): {abs(first - second):.2e} ({'OK' if abs(first - second) < 1e-3 else 'DIFFERS'})")
    return {"rows": rows, "loss_abs_diff": abs(first - second)}
