"""Can the LM learn ShapesWorld's relation questions when it is *given* the layout as text?

The bridge's ``grid_tags`` connector shows SmolLM2 a layout ("3 1 red square 6 5 blue star none ..."), and
after stage 2 the LM answers colour, shape, count and existence questions well but relation questions at
chance. This probe separates the two halves of that failure: it replaces the image tokens with the
*ground-truth* layout written as text (each object's cell on an ``side × side`` grid, in ``grid_tags``'s
raster order and format), trains LoRA on relation questions only, exactly as stage 2 lays out a dialogue
(:func:`align.mllm_data.encode_dialogue`), and scores yes/no on held-out scenes. If the LM cannot learn the
comparison from a perfect layout, no connector that emits such a layout will make it answer.

Layout formats (:func:`layout_text`):

* ``digits`` — what ``grid_tags`` emits: ``"col row colour shape"`` per object, raster order, ``none`` padding;
* ``phrases`` — every ordered pair of objects on each axis, worded like the questions
  ("red square left of blue star; blue star right of red square; ..."): the answer is a substring lookup.

``python -m experiments.bridge.relation_probe --layout digits --steps 200`` prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from align.mllm_data import IGNORE, ChatFormat, encode_dialogue, encode_question

log = logging.getLogger(__name__)

LAYOUTS = ("digits", "phrases")


def object_cells(scene: dict, side: int = 8) -> list[tuple[int, int, str, str]]:
    """``(row, column, colour, shape)`` per object (1-based cells of an ``side × side`` grid), raster order."""
    cells = [(min(int(o["y"] * side), side - 1) + 1, min(int(o["x"] * side), side - 1) + 1, o["colour"], o["shape"])
             for o in scene["objects"]]
    return sorted(cells)


def layout_text(scene: dict, layout: str = "digits", side: int = 8, slots: int = 4, blank: str = "none") -> str:
    """The scene's ground-truth layout as text in format ``layout`` (module doc)."""
    cells = object_cells(scene, side)
    if layout == "digits":
        shown = [f"{c} {r} {colour} {shape}" for r, c, colour, shape in cells[:slots]]
        return " ".join(shown + [" ".join([blank] * 4)] * (slots - len(shown)))
    if layout == "phrases":
        out = []
        for i, (ri, ci, *a) in enumerate(cells):
            for j, (rj, cj, *b) in enumerate(cells):
                if i != j:
                    for holds, word in ((ci < cj, "left of"), (ci > cj, "right of"), (ri < rj, "above"),
                                        (ri > rj, "below")):
                        if holds:
                            out.append(f"{' '.join(a)} {word} {' '.join(b)}")
        return "; ".join(out) or blank
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def relation_questions(scenes: Sequence[dict], rows: Sequence[int], n: int, seed: int, held_out: bool = False
                       ) -> list[tuple[int, str, str]]:
    """``n`` relation questions ``(scene row, question, answer)`` drawn from ``rows`` (balanced yes/no)."""
    from experiments.data.vqa import _draw, _phrasings

    rng = np.random.default_rng(seed)
    out: list[tuple[int, str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError("the scenes hold too few object pairs for relation questions")
        row = int(rows[int(rng.integers(len(rows)))])
        qa = _draw(scenes[row], "relation", rng, _phrasings("relation", held_out))
        if qa is not None:
            out.append((row, *qa))
    return out


def _batch(tokenizer: Any, fmt: ChatFormat, items: Sequence[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    ids, labels = [], []
    for layout, q, a in items:
        prefix = list(tokenizer(fmt.user + layout, add_special_tokens=False)["input_ids"])
        x, y = encode_dialogue(tokenizer, [(q, a)], fmt)
        ids.append(prefix + x)
        labels.append([IGNORE] * len(prefix) + y)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
            "labels": torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels])}


@torch.no_grad()
def yes_no_accuracy(model: Any, tokenizer: Any, fmt: ChatFormat, items: Sequence[tuple[str, str, str]]) -> float:
    """Share of ``(layout, question, answer)`` whose answer (yes/no) has the higher next-token logit."""
    space = "" if fmt.assistant[-1:].isspace() else " "
    yes, no = (tokenizer(space + w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    right = 0
    for layout, q, a in items:
        ids = list(tokenizer(fmt.user + layout, add_special_tokens=False)["input_ids"]) + encode_question(
            tokenizer, q, fmt)
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        right += ("yes" if logits[yes] > logits[no] else "no") == a
    return right / max(1, len(items))


def run_probe(model: Any, tokenizer: Any, scenes: Sequence[dict], train_rows: Sequence[int],
              test_rows: Sequence[int], layout: str = "digits", steps: int = 200, batch_size: int = 8,
              lr: float = 1e-3, lora_r: int = 8, n_test: int = 300, side: int = 8, seed: int = 0
              ) -> dict[str, Any]:
    """LoRA (on the attention projections, as stage 2) on ``steps × batch_size`` relation questions about
    ``train_rows`` with their ground-truth layouts; yes/no accuracy on ``n_test`` questions about ``test_rows``,
    with the true layout and with another test scene's layout (the shuffled control). ``model`` is frozen."""
    from peft import LoraConfig, get_peft_model

    from align.mllm import LORA_TARGETS

    torch.manual_seed(seed)
    fmt = ChatFormat.for_tokenizer(tokenizer)
    text = {r: layout_text(scenes[r], layout, side) for r in {*map(int, train_rows), *map(int, test_rows)}}
    train = [(text[r], q, a) for r, q, a in relation_questions(scenes, train_rows, steps * batch_size, seed + 1)]
    test = relation_questions(scenes, test_rows, n_test, seed + 2)
    other = np.random.default_rng(seed + 3).permutation(len(test))
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(LORA_TARGETS)))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    t0, losses = time.perf_counter(), []
    peft_model.train()
    for step in range(steps):
        loss = peft_model(**_batch(tokenizer, fmt, train[step * batch_size:(step + 1) * batch_size])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0:
            log.info("relation probe (%s): step %d, loss %.3f", layout, step, losses[-1])
    peft_model.eval()
    out = {"layout": layout, "steps": steps, "train_seconds": time.perf_counter() - t0,
           "loss_first_25": float(np.mean(losses[:25])), "loss_last_25": float(np.mean(losses[-25:])),
           "accuracy": yes_no_accuracy(peft_model, tokenizer, fmt, [(text[r], q, a) for r, q, a in test]),
           "accuracy_shuffled_layout": yes_no_accuracy(
               peft_model, tokenizer, fmt, [(text[test[k][0]], q, a) for k, (_, q, a) in zip(other, test)]),
           "n_test": len(test), "example": train[0]}
    peft_model.unload()  # leaves the base model as it was
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=LAYOUTS, default="digits")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--llm", default="smollm2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from align.llm import load_llm, low_precision_linears
    from experiments.bridge.features import use_bf16_linears
    from experiments.data.shapesworld import load_shapesworld

    sw = load_shapesworld(n_scenes=1500, image_size=128, seed=0)  # the bridge's data
    model, tokenizer = load_llm(args.llm)
    if use_bf16_linears("auto"):  # as the bridge (llm.linears_bf16: auto)
        low_precision_linears(model)
    print(json.dumps(run_probe(model, tokenizer, sw.scenes, sw.splits["train"], sw.splits["test"], args.layout,
                               args.steps, args.batch_size, args.lr, args.lora_r, args.n_test)))


if __name__ == "__main__":
    main()
