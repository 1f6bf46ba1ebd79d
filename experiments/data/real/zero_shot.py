"""DeViSE zero-shot on labelled photos (Fashion-MNIST): train on the seen classes, score the unseen ones, beside a
supervised upper bound and chance. The pieces the ``zero_shot`` runner (:mod:`experiments.runners.zero_shot`,
``alignfuse run fashion_mnist``) orchestrates:

* :func:`zero_shot_features`: frozen image features (pooled, through the feature cache) of every row of the
  splits, and the text embeddings of the class captions ("a photo of a <class>");
* :func:`fit_devise` / :func:`devise_zero_shot`: :class:`align.devise.DeViSE` trained on the seen classes against
  their embeddings, scored by :func:`align.devise.zero_shot_eval` over all classes;
* :func:`supervised_upper_bound`: logistic regression trained on every class (unseen ones included) with the same
  features and per-class budget, scored with the same groups (unseen among the unseen, unseen / seen among all).

``python -m experiments.data.real.zero_shot [TRAIN_PER_CLASS [TEST_PER_CLASS [IMAGE_SIZE]]]`` runs the bundled
``fashion_mnist`` config with those data options and prints its table.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

KS = (1, 2, 5)
GROUPS = ("unseen_only", "unseen", "seen", "harmonic")


def zero_shot_features(data: Any, rows: np.ndarray, image_size: int, image_encoder: str = "mobilenet_v2",
                       text_encoder: str = "minilm", cache_root: Any = None
                       ) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """``(feat, class_emb)``: ``feat(idx)`` float32 [len(idx), d] pooled image features of data rows ``idx`` (any
    subset of ``rows``), computed once for ``rows`` through the feature cache; ``class_emb`` [C, d_txt] the text
    encoder's embeddings of the class captions. ``data``: a :class:`FashionMNISTData`-like object
    (``images_rgb(rows, size)``, ``class_names``, ``fingerprint``)."""
    from experiments.data.real.fashion_mnist import caption
    from experiments.features import FeatureCache, build_encoder, extract_features

    rows = np.unique(np.asarray(rows))
    cache = FeatureCache(None if cache_root is None else f"{cache_root}/features")
    feats = extract_features(data.images_rgb(rows, image_size), build_encoder(image_encoder, image_size=image_size),
                             cache, f"{data.fingerprint}-{len(rows)}rows-{image_size}px", "all",
                             kinds=["pooled"])["pooled"]
    where = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))

    def feat(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        pos = where[idx] if len(idx) and idx.max() < len(where) else np.full(len(idx), -1)
        if (pos < 0).any():
            raise ValueError(f"rows {idx[pos < 0][:5].tolist()} have no features (not among the {len(rows)} rows)")
        return np.asarray(feats[pos], dtype=np.float32)

    emb = build_encoder(text_encoder).encode([caption(n) for n in data.class_names])["pooled"]
    return feat, np.asarray(emb, dtype=np.float32)


def fit_devise(x_train: np.ndarray, y_train: np.ndarray, class_embeddings: np.ndarray, seen: Sequence[int],
               train_config: Any, options: dict[str, Any] | None = None) -> Any:
    """A :class:`align.devise.DeViSE` trained by the Trainer (``train_config``: an ``experiments.trainer.TrainConfig``;
    with its ``out_dir`` it resumes from a checkpoint) on features ``x_train`` [n, d] with labels ``y_train`` (indices
    into all C classes, seen ones only) against the seen classes' rows of ``class_embeddings`` [C, d_txt]."""
    import torch

    from align.devise import DeViSE
    from experiments.trainer import Trainer

    seen = sorted(int(c) for c in seen)
    if not np.isin(y_train, seen).all():
        raise ValueError(f"y_train holds unseen classes {sorted(set(np.unique(y_train)) - set(seen))}")
    emb = torch.as_tensor(np.asarray(class_embeddings), dtype=torch.float32)
    torch.manual_seed(train_config.seed)
    model = DeViSE(image_dim=x_train.shape[1], class_embeddings=emb[seen], **(options or {}))
    y_seen = torch.as_tensor(np.searchsorted(seen, y_train))
    Trainer(train_config).fit(model, {"image": torch.as_tensor(x_train), "label": y_seen})
    return model.eval()


def devise_zero_shot(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     class_embeddings: np.ndarray, seen: Sequence[int], seeds: Sequence[int] = (0, 1, 2),
                     steps: int = 600, options: dict[str, Any] | None = None) -> list[dict]:
    """:func:`fit_devise` once per seed (``steps`` steps, batch 256, AdamW 1e-3, no checkpoints) and
    :func:`align.devise.zero_shot_eval` of each on ``x_test`` / ``y_test`` over all ``class_embeddings``."""
    from experiments.trainer import TrainConfig

    out = []
    for seed in seeds:
        cfg = TrainConfig(max_steps=steps, batch_size=256, lr=1e-3, weight_decay=0.05, warmup_steps=20, seed=seed,
                          progress=False, device="cpu", save_every=None)
        model = fit_devise(x_train, y_train, class_embeddings, seen, cfg, {"margin": 0.1, **(options or {})})
        out.append(score_devise(model, x_test, y_test, class_embeddings, seen))
    return out


def score_devise(model: Any, x_test: np.ndarray, y_test: np.ndarray, class_embeddings: np.ndarray,
                 seen: Sequence[int]) -> dict[str, dict[str, float]]:
    """:func:`align.devise.zero_shot_eval` (hit@1, 2, 5 per group) of a trained DeViSE over all C classes."""
    import torch

    from align.devise import zero_shot_eval

    emb = torch.as_tensor(np.asarray(class_embeddings), dtype=torch.float32)
    seen_mask = torch.tensor([c in set(int(s) for s in seen) for c in range(len(emb))])
    return zero_shot_eval(model, torch.as_tensor(x_test), torch.as_tensor(y_test), emb, seen_mask, ks=KS)


def supervised_upper_bound(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                           unseen: Sequence[int], c: float = 0.1) -> dict[str, dict[str, float]]:
    """Logistic regression (``C=c``, features standardised on ``x_train``) trained on every class, scored like
    :func:`score_devise`: ``unseen_only`` (unseen rows among the unseen labels), ``unseen`` and ``seen`` (among all
    labels) hit@k as fractions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=c).fit(sc.transform(x_train), y_train)
    classes = clf.classes_
    proba = clf.predict_proba(sc.transform(x_test))
    order = classes[np.argsort(-proba, axis=1)]
    unseen = [int(u) for u in unseen]
    is_unseen = np.isin(y_test, unseen)

    def hits(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {f"hit@{k}": float((pred[:, :k] == y[:, None]).any(1).mean()) if len(y) else float("nan")
                for k in KS}

    cols = [int(np.flatnonzero(classes == u)[0]) for u in unseen]
    among = np.asarray(unseen)[np.argsort(-proba[is_unseen][:, cols], axis=1)]
    return {"unseen_only": hits(among, y_test[is_unseen]), "unseen": hits(order[is_unseen], y_test[is_unseen]),
            "seen": hits(order[~is_unseen], y_test[~is_unseen])}


def chance(n_classes: int, n_unseen: int) -> dict[str, dict[str, float]]:
    """hit@k of a uniform random ranking: among the unseen labels and among all labels."""
    def hk(n: int) -> dict[str, float]:
        return {f"hit@{k}": min(k, n) / n for k in KS}

    return {"unseen_only": hk(n_unseen), "unseen": hk(n_classes), "seen": hk(n_classes)}


if __name__ == "__main__":  # the README's Fashion-MNIST table through the bundled config (alignfuse run fashion_mnist)
    import sys

    from experiments.config import config_path, read_yaml
    from experiments.runners import zero_shot as runner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = [int(a) for a in sys.argv[1:4]]
    raw = read_yaml(config_path("fashion_mnist"))
    for key, v in zip(("train_per_class", "test_per_class"), args):
        raw["data"][key] = v
    if len(args) > 2:
        raw["image_size"] = args[2]
    print(runner.format_results(runner.run(runner.load(raw, "fashion_mnist.yaml"))))
