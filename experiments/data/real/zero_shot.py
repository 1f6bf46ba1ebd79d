"""DeViSE zero-shot on Fashion-MNIST: train on the seen classes, score the unseen ones, beside an upper bound and chance.

``python -m experiments.data.real.zero_shot [TRAIN_PER_CLASS [TEST_PER_CLASS [IMAGE_SIZE]]]`` prints the README table:
hit@k of DeViSE (3 seeds) on the unseen classes among the unseen labels only and among all 10 (generalised zero-shot),
on the seen classes among all 10, the supervised upper bound (logistic regression trained on all 10 classes with the
same features and per-class budget) and chance. Image features: frozen MobileNetV2 (ImageNet) pooled at IMAGE_SIZE px,
through the feature cache; label embeddings: MiniLM of "a photo of a <class>".
(The align runner takes caption data; this protocol needs class labels, so it lives here until a runner does.)
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def devise_zero_shot(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     class_embeddings: np.ndarray, seen: Sequence[int], seeds: Sequence[int] = (0, 1, 2),
                     steps: int = 600) -> list[dict]:
    """Train :class:`align.devise.DeViSE` on features ``x_train`` [n, d] with labels ``y_train`` (indices into all C
    classes, seen ones only) against the seen classes' embeddings, once per seed, and return
    :func:`align.devise.zero_shot_eval` on ``x_test`` / ``y_test`` over all ``class_embeddings`` [C, d_txt]."""
    import torch

    from align.devise import DeViSE, zero_shot_eval
    from experiments.trainer import TrainConfig, Trainer

    seen = list(seen)
    emb = torch.as_tensor(np.asarray(class_embeddings), dtype=torch.float32)
    seen_mask = torch.tensor([c in seen for c in range(len(emb))])
    if not np.isin(y_train, seen).all():
        raise ValueError("y_train holds unseen classes")
    y_seen = torch.as_tensor(np.searchsorted(seen, y_train))
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = DeViSE(image_dim=x_train.shape[1], class_embeddings=emb[seen], margin=0.1)
        cfg = TrainConfig(max_steps=steps, batch_size=256, lr=1e-3, weight_decay=0.05, warmup_steps=20, seed=seed,
                          progress=False, device="cpu", save_every=None)
        Trainer(cfg).fit(model, {"image": torch.as_tensor(x_train), "label": y_seen}, resume=False)
        model.eval()
        out.append(zero_shot_eval(model, torch.as_tensor(x_test), torch.as_tensor(y_test), emb, seen_mask,
                                  ks=(1, 2, 5)))
    return out


def _main(train_per_class: int, test_per_class: int, size: int) -> None:
    import time

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from experiments.data.real.fashion_mnist import caption, load_fashion_mnist
    from experiments.features import FeatureCache, build_encoder, extract_features

    t0 = time.perf_counter()
    d = load_fashion_mnist(train_per_class=train_per_class, test_per_class=test_per_class)
    full = load_fashion_mnist(train_per_class=train_per_class, test_per_class=test_per_class, unseen=())  # same rows
    rows = np.unique(np.concatenate([full.splits["train"], full.splits["val"], full.splits["test"]]))
    feats = extract_features(d.images_rgb(rows, size), build_encoder("mobilenet_v2", image_size=size), FeatureCache(),
                             f"{d.fingerprint}-{len(rows)}rows-{size}px", "all", kinds=["pooled"])["pooled"]
    where = {r: i for i, r in enumerate(rows)}

    def feat(idx: np.ndarray) -> np.ndarray:
        return np.asarray(feats[[where[r] for r in idx]], dtype=np.float32)

    t_feat = time.perf_counter() - t0
    emb = np.asarray(build_encoder("minilm").encode([caption(n) for n in d.class_names])["pooled"])
    tr, te = d.splits["train"], np.concatenate([d.splits["test"], d.splits["zeroshot"]])
    sc = StandardScaler().fit(feat(tr))
    res = devise_zero_shot(sc.transform(feat(tr)).astype(np.float32), d.labels[tr],
                           sc.transform(feat(te)).astype(np.float32), d.labels[te], emb, d.seen)
    y = d.labels[te]
    unseen_rows = np.isin(y, d.unseen)
    sup_tr = full.splits["train"]
    sc2 = StandardScaler().fit(feat(sup_tr))
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(sc2.transform(feat(sup_tr)), full.labels[sup_tr])
    proba = clf.predict_proba(sc2.transform(feat(te)))
    order = np.argsort(-proba, axis=1)

    def sup(mask: np.ndarray, k: int) -> float:
        return 100 * float((order[mask, :k] == y[mask, None]).any(1).mean())

    among_unseen = np.asarray(d.unseen)[proba[unseen_rows][:, list(d.unseen)].argmax(1)]
    sup_unseen_only = 100 * float((among_unseen == y[unseen_rows]).mean())

    def ms(group: str, k: str) -> str:
        v = 100 * np.array([r[group][k] for r in res])
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"

    print(f"{len(tr)} seen-class training photos, {len(d.splits['test'])} seen and {len(d.splits['zeroshot'])} unseen "
          f"test photos (unseen: {', '.join(d.class_names[c] for c in d.unseen)}); MobileNetV2 pooled at {size} px "
          f"({t_feat:.0f} s with the photos' loading)")
    print("| | unseen, among the 2 unseen: hit@1 | unseen, among all 10: hit@1 | hit@5 | seen, among all 10: hit@1 "
          "| hit@5 | harmonic hit@1 |\n|---|---:|---:|---:|---:|---:|---:|")
    print(f"| DeViSE (3 seeds) | {ms('unseen_only', 'hit@1')} | {ms('unseen', 'hit@1')} | {ms('unseen', 'hit@5')} | "
          f"{ms('seen', 'hit@1')} | {ms('seen', 'hit@5')} | {ms('harmonic', 'hit@1')} |")
    print(f"| supervised upper bound (all 10 classes) | {sup_unseen_only:.1f} | {sup(unseen_rows, 1):.1f} | "
          f"{sup(unseen_rows, 5):.1f} | {sup(~unseen_rows, 1):.1f} | {sup(~unseen_rows, 5):.1f} | |")
    print("| chance | 50.0 | 10.0 | 50.0 | 10.0 | 50.0 | |")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    import sys

    args = [int(a) for a in sys.argv[1:]] + [300, 300, 64][len(sys.argv) - 1:]
    _main(*args[:3])
