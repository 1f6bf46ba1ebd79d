"""What the aligner comparison trains on and how it scores an aligner, over :class:`experiments.views.PairViews`.

* :func:`train_pairs`: the training pairs of an aligner's declared inputs (optionally only partly paired);
* :func:`evaluate_aligner`: retrieval both ways on test, hard-negative accuracy where the data has hard negatives,
  and zero-shot label prediction for aligners that predict labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def as_input(x: Any) -> Any:
    """Memory-mapped cache rows → a float32 tensor (float16 widened); other inputs unchanged."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, dtype=np.float32 if x.dtype == np.float16 else x.dtype))
    return x


def train_pairs(inputs: dict[str, str], views: Any, seed: int, pairing_ratio: float | None = None):
    """A ``PairedDataset`` of the train split for ``inputs`` (batch key → kind); with ``pairing_ratio`` < 1, only that
    share of captions keeps its image (the others get the image of another unpaired caption, flag ``paired``)."""
    from experiments.pairs import PairedDataset

    per_image, per_text = {}, {}
    texts_kind = inputs.get("text")
    text, t2i = views.split_text(texts_kind, "train") if texts_kind else (None, views.captions("train")[1])
    for key, kind in inputs.items():
        if key == "text":
            per_text["text"] = text
        elif key == "label":
            per_image["label"] = views.labels("train")
        else:
            per_image[key] = views.image(kind, "train")
    if pairing_ratio is not None and pairing_ratio < 1.0:
        from align.cycle_ae import partially_paired

        pp = partially_paired(torch.arange(len(t2i)), torch.from_numpy(t2i), pairing_ratio, seed)
        t2i = pp["text"].numpy()
        per_text["paired"] = pp["paired"].numpy()
    return PairedDataset(per_image, per_text, t2i)


def evaluate_aligner(model: Any, inputs: dict[str, str], views: Any, save_dir: Path | None = None) -> dict[str, Any]:
    """Test retrieval (both ways), hard-negative accuracy, for label predictors zero-shot hit@k, and for models with
    ``itm_scores`` (a matching head) ``"matching"``: retrieval with and without ITM re-ranking of the top
    ``model.rerank_k`` and hard-negative accuracy by ITM (:func:`experiments.qformer_eval.matching_metrics`).

    With ``save_dir``, the test embeddings are written there (``image_emb.npy``, ``text_emb.npy``,
    ``text_to_image.npy``: the inputs of ``alignfuse retrieval``), atomically.
    """
    from align.base import encode_in_batches
    from align.weights import write_file_atomically
    from experiments.retrieval import hard_negative_metrics, retrieval_metrics

    img_kind, txt_kind = inputs["image"], inputs.get("text", "vector")
    img_emb = encode_in_batches(model, "image", as_input(views.image(img_kind, "test")), batch_size=256)
    text, t2i = views.split_text(txt_kind, "test")
    txt_emb = encode_in_batches(model, "text", as_input(text), batch_size=256)
    if save_dir is not None:
        for name, arr in (("image_emb", img_emb.numpy()), ("text_emb", txt_emb.numpy()), ("text_to_image", t2i)):
            write_file_atomically(Path(save_dir) / f"{name}.npy", lambda f, a=arr: np.save(f, a))
    out = retrieval_metrics(img_emb, txt_emb, t2i, progress=False)
    out["n_test_images"] = int(len(img_emb))
    hn = views.hard_negatives("test")
    if hn is not None:
        src, neg, owner = hn
        pos = encode_in_batches(model, "text", as_input(views.text(txt_kind, src, "hn-src-test")), 256)
        negs = encode_in_batches(model, "text", as_input(views.text(txt_kind, neg, "hn-neg-test")), 256)
        out["hard_negative_accuracy"] = hard_negative_metrics(img_emb[torch.as_tensor(owner)], pos, negs,
                                                              np.arange(len(owner)))["per_pair"]
    if hasattr(model, "itm_scores"):  # a matching head (BLIP-2's ITM): re-ranked retrieval, hard negatives by ITM
        from experiments.qformer_eval import matching_metrics

        out["matching"] = matching_metrics(model, as_input(views.image(img_kind, "test")).numpy(), text, t2i, hn)
    if hasattr(model, "predict") and "label" in inputs:
        out["zero_shot"] = zero_shot(model, views)
    return out


def zero_shot(model: Any, views: Any) -> dict[str, Any]:
    """Flat hit@k on test (seen labels) and on the held-out-label rows (unseen labels), searching all labels."""
    from align.devise import zero_shot_eval

    ce = views.class_embeddings()
    seen = np.zeros(len(ce), dtype=bool)
    seen[np.unique(views.labels("train"))] = True
    rows = views.zero_shot_rows()
    x = torch.from_numpy(np.asarray(views.image_features()["pooled"][rows], dtype=np.float32))
    labels = torch.from_numpy(np.asarray(views.src.labels)[rows])
    return zero_shot_eval(model, x, labels, ce, torch.from_numpy(seen))


def trained_params(model: Any, n_trainable: int) -> int:
    """``n_trainable`` (the Trainer's count) for gradient models; for closed-form ones, the learned ``*weights_``."""
    if isinstance(model, torch.nn.Module):
        return int(n_trainable)
    return int(sum(np.asarray(v).size for k, v in vars(model).items() if k.endswith("weights_")))
