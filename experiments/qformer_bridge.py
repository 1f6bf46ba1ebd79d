"""BLIP-2's stage 2 on ShapesWorld: a trained Q-Former aligner (queries out) + a linear projection into frozen
SmolLM2, against the same architecture before stage 1 and the toolkit's ``qformer`` connector from scratch.

``python -m experiments.qformer_bridge --aligner runs/qformer_ablation/<variant>-seed0.pt`` trains each
connector on caption loss (the shared Trainer, same data, steps and learning rate) and reports the validation
caption NLL (nats/token) with the image and with a shuffled image, at step 0 and every ``--eval-every`` steps.
The aligner's settings (layers, queries) must match those it was trained with.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def _val_nll(mllm, grid: np.ndarray, texts: list[str]) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        mllm.eval()
        for mode in ("image", "shuffled"):
            nll, m = mllm.token_nll({"image": torch.from_numpy(grid), "text": texts}, mode)
            out[mode] = float(nll.sum() / m.sum())
        mllm.train()
    out["image_gain"] = out["shuffled"] - out["image"]
    return out


def build_connectors(args, image_dim: int, lm_dim: int) -> dict[str, torch.nn.Module]:
    from align.base import build_aligner
    from align.connectors import build_connector
    from align.qformer_aligner import qformer_connector

    kw = dict(image_dim=image_dim, num_queries=args.queries, num_layers=args.layers, max_text_len=args.max_text_len)
    torch.manual_seed(0)
    trained = build_aligner("qformer", **kw, num_classes=args.num_classes)
    trained.load_state_dict(torch.load(args.aligner, weights_only=True))
    torch.manual_seed(0)
    untrained = build_aligner("qformer", **kw, num_classes=args.num_classes)
    conns: dict[str, torch.nn.Module] = {}
    for init in args.inits:
        torch.manual_seed(0)
        if init == "stage1":
            conns["qformer-blip2/stage1"] = qformer_connector(trained, lm_dim)
        elif init == "minilm":
            conns["qformer-blip2/minilm"] = qformer_connector(untrained, lm_dim)
        else:
            conns["qformer/random"] = build_connector("qformer", vision_dim=image_dim, lm_dim=lm_dim,
                                                      num_queries=args.queries)
    return conns


def main(argv: Sequence[str] | None = None) -> None:
    from align.llm import load_llm
    from align.mllm import MultimodalLM
    from experiments.pairs import PairedDataset
    from experiments.qformer_eval import _data
    from experiments.trainer import TrainConfig, Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligner", required=True, help="state dict of a trained qformer aligner")
    p.add_argument("--inits", nargs="+", default=["stage1", "minilm", "random"],
                   choices=["stage1", "minilm", "random"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--max-text-len", type=int, default=24)
    p.add_argument("--num-classes", type=int, default=36)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--n-val", type=int, default=48)
    p.add_argument("--out", default="runs/qformer_bridge")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ds, grid, _ = _data(1500, 150)
    llm, tok = load_llm("smollm2")
    lm_dim = llm.get_input_embeddings().embedding_dim
    tr, va = np.asarray(ds.splits["train"]), np.asarray(ds.splits["val"])[: args.n_val]
    texts = [t for i in tr for t in ds.captions[i]]
    t2i = np.repeat(np.arange(len(tr)), [len(ds.captions[i]) for i in tr])
    data = PairedDataset({"image": grid[tr]}, {"text": texts}, t2i)
    val_grid = np.asarray(grid[va], dtype=np.float32)
    val_texts = [ds.captions[i][0] for i in va]
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    for name, conn in build_connectors(args, int(grid.shape[-1]), lm_dim).items():
        mllm = MultimodalLM(llm, tok, conn)
        curve = [{"step": 0, **_val_nll(mllm, val_grid, val_texts)}]
        cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=5,
                          eval_every=args.eval_every, monitor="image", mode="min", seed=0, progress=False,
                          grad_clip=1.0)
        t0 = time.perf_counter()
        res = Trainer(cfg, evaluator=lambda m: _val_nll(m, val_grid, val_texts)).fit(mllm, data)
        curve += [{k: r[k] for k in ("step", "image", "shuffled", "image_gain")}
                  for r in res.history if r["kind"] == "eval"]
        results["runs"][name] = {"curve": curve, "train_seconds": time.perf_counter() - t0,
                                 "params_trained": mllm.num_trainable_parameters()}
        print(name, json.dumps(curve[-1]), flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
