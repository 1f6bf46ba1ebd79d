"""Decision-level fusion: combining rules, sklearn combiners (stacking out-of-fold), the nn heads,
and the learnability contrast with feature-level fusion on a complementary (XOR) task."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.tree import DecisionTreeClassifier

from fusion import (
    LateFusionHeads,
    MeanFusion,
    StackingFusion,
    VoteFusion,
    WeightedFusion,
    build_fusion,
    combine_probabilities,
    fusion_module_params,
    model_params,
)

DIMS = {"image": 6, "depth": 4, "text": 5}
C = 3
DECISION_NAMES = ["decision/mean", "decision/weighted", "decision/vote", "decision/stacking"]


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(n: int = 150, seed: int = 0) -> dict[str, np.ndarray]:
    """Each modality carries a noisy view of the label (so per-modality classifiers are decent)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    data = {}
    for m, d in DIMS.items():
        x = rng.normal(size=(n, d))
        x[:, :C] += 1.5 * np.eye(C)[y]
        data[m] = x
    data["label"] = y
    return data


# -- combining rules -------------------------------------------------------------------------


def test_mean_and_weighted_match_brute_force():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(C), size=(3, 5))  # [M, B, C]
    present = rng.random((3, 5)) > 0.3
    present[:, 0] = False  # sample 0: no modality at all
    w = np.array([0.2, 0.5, 1.0])
    p_t, present_t = torch.from_numpy(p), torch.from_numpy(present)
    mean = combine_probabilities(p_t, present_t, "mean").numpy()
    weighted = combine_probabilities(p_t, present_t, "weighted", torch.from_numpy(w)).numpy()
    for b in range(5):
        idx = np.flatnonzero(present[:, b])
        if idx.size == 0:
            np.testing.assert_allclose(mean[b], 1 / C)
            np.testing.assert_allclose(weighted[b], 1 / C)
        else:
            np.testing.assert_allclose(mean[b], p[idx, b].mean(0))
            np.testing.assert_allclose(weighted[b], (w[idx, None] * p[idx, b]).sum(0) / w[idx].sum())


def vote(rows, present=None):
    p = torch.tensor(rows, dtype=torch.float64).unsqueeze(1)  # [M, 1, C]
    pres = torch.ones(p.shape[:2], dtype=torch.bool) if present is None else torch.tensor(present).unsqueeze(1)
    out = combine_probabilities(p, pres, "vote")[0]
    assert torch.isclose(out.sum(), torch.tensor(1.0, dtype=torch.float64))
    return int(out.argmax())


def test_vote_majority_beats_confidence():
    # two modalities vote 0 weakly, one votes 1 with certainty: the majority (0) wins
    assert vote([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.0, 1.0, 0.0]]) == 0


def test_vote_ties_broken_by_summed_probability():
    # 1-1 tie between classes 0 and 1: summed probability 0.4+0.9 for 1 beats 0.6+0.05 for 0
    assert vote([[0.6, 0.4, 0.0], [0.05, 0.9, 0.05]]) == 1
    assert vote([[0.9, 0.1, 0.0], [0.05, 0.5, 0.45]]) == 0
    # 2-2 tie between 0 (summed 1.1) and 1 (1.17); class 2 has the most mass (1.73) but no vote
    assert vote([[0.5, 0.1, 0.4], [0.5, 0.1, 0.4], [0.1, 0.46, 0.44], [0.0, 0.51, 0.49]]) == 1


def test_vote_drops_missing_modality():
    rows = [[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.0, 0.9, 0.1], [0.1, 0.8, 0.1], [0.0, 0.7, 0.3]]
    assert vote(rows) == 1  # 3 votes for 1
    assert vote(rows, present=[True, True, True, False, False]) == 0  # only 1 vote left for class 1
    p = torch.rand(2, 4, C).softmax(-1)
    uniform = combine_probabilities(p, torch.zeros(2, 4, dtype=torch.bool), "vote")
    torch.testing.assert_close(uniform, torch.full((4, C), 1 / C))
    with pytest.raises(ValueError, match="unknown combine operator"):
        combine_probabilities(p, torch.ones(2, 4, dtype=torch.bool), "median")


# -- sklearn combiners -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECISION_NAMES)
def test_sklearn_combiners_fit_predict_and_missing(name):
    train, test = dataset(seed=0), dataset(n=40, seed=1)
    model = build_fusion(name, in_dims=DIMS, num_classes=C).fit(train)  # y from train["label"]
    assert (model.level, model.operator, model.name) == ("decision", name.split("/")[1], name)
    assert set(model.estimators_) == set(DIMS)
    proba = model.predict_proba(test)
    assert proba.shape == (40, C) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert model.score(test, test["label"]) > 0.6
    for absent in DIMS:
        out = model.predict_proba({k: v for k, v in test.items() if k != absent})
        assert out.shape == (40, C) and np.isfinite(out).all() and not np.allclose(out, proba)
    mask = np.arange(40) % 2 == 0
    masked = dict(test, text=test["text"].copy(), text_mask=mask)
    masked["text"][~mask] = np.nan
    out = model.predict_proba(masked)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[mask], proba[mask])
    assert not np.allclose(out[~mask], proba[~mask])
    nothing = model.predict_proba({"label": test["label"]})
    assert nothing.shape == (40, C) and np.isfinite(nothing).all()


def test_stacking_meta_learner_sees_out_of_fold_predictions():
    data = dataset()
    y = data["label"]
    model = StackingFusion(in_dims=DIMS, cv=4).fit(data, y)
    expected = []
    for m in DIMS:  # what StackingClassifier does: cross_val_predict with the same cv
        p = cross_val_predict(LogisticRegression(max_iter=1000), data[m], y, cv=4, method="predict_proba")
        expected.append(p - 1 / C)
    np.testing.assert_allclose(model.oof_meta_features_, np.concatenate(expected, axis=1))
    assert fusion_module_params(model) == (len(DIMS) * C) * C + C  # LogisticRegression coef_ + intercept_
    base = sum(d * C + C for d in DIMS.values())  # one LogisticRegression per modality
    assert model_params(model) == base + fusion_module_params(model)


def test_stacking_with_memorising_base_model_has_no_label_leak():
    rng = np.random.default_rng(0)
    data = {m: rng.normal(size=(120, d)) for m, d in DIMS.items()}  # pure noise: nothing to learn
    y = rng.integers(0, C, 120)
    model = StackingFusion(in_dims=DIMS, estimator=DecisionTreeClassifier(random_state=0), cv=5).fit(data, y)
    tree = model.estimators_["image"]
    in_sample = tree.predict_proba(data["image"])[np.arange(120), y]
    assert (in_sample == 1.0).all()  # the base model memorises its training data ...
    oof_true = model.oof_meta_features_[:, :C][np.arange(120), y] + 1 / C
    assert oof_true.mean() < 0.6  # ... but the meta-learner's inputs are out-of-fold (~chance on noise)


def test_weighted_uses_out_of_fold_accuracy_or_given_weights():
    data = dataset()
    data["text"] = np.random.default_rng(3).normal(size=data["text"].shape)  # uninformative modality
    y = data["label"]
    model = WeightedFusion(in_dims=DIMS, cv=3).fit(data)
    for i, m in enumerate(DIMS):
        p = cross_val_predict(LogisticRegression(max_iter=1000), data[m], y, cv=3, method="predict_proba")
        assert model.weights_[i] == pytest.approx((p.argmax(1) == y).mean())
    acc = model.validation_accuracy_
    assert acc["text"] < min(acc["image"], acc["depth"])
    assert fusion_module_params(model) == len(DIMS)
    given = WeightedFusion(in_dims=DIMS, weights={"image": 1.0, "depth": 0.0, "text": 0.0}).fit(data)
    np.testing.assert_allclose(given.predict_proba(data), given.estimators_["image"].predict_proba(data["image"]))
    with pytest.raises(ValueError, match="weights has keys"):
        WeightedFusion(in_dims=DIMS, weights={"image": 1.0}).fit(data)


def test_sklearn_conventions_and_errors():
    data = dataset()
    model = clone(VoteFusion(in_dims=DIMS, estimator=LogisticRegression(C=0.5)))
    assert model.get_params()["estimator"].C == 0.5
    inferred = MeanFusion().fit({m: data[m] for m in ("image", "depth")}, data["label"])  # modalities from keys
    assert inferred.modalities == ("image", "depth") and fusion_module_params(inferred) == 0
    per_modality = MeanFusion(estimator={"image": DecisionTreeClassifier(max_depth=2), "depth": LogisticRegression()})
    assert isinstance(per_modality.fit(data).estimators_["image"], DecisionTreeClassifier)
    with pytest.raises(ValueError, match="'depth'.*\\[N, 4\\]"):
        MeanFusion(in_dims=DIMS).fit(dict(data, depth=data["depth"][:, :3]))
    with pytest.raises(ValueError, match="absent from every training sample"):
        MeanFusion(in_dims=DIMS).fit(dict(data, text_mask=np.zeros(150, bool)))
    with pytest.raises(AttributeError, match="not fitted"):
        MeanFusion(in_dims=DIMS).predict_proba(data)


# -- nn heads --------------------------------------------------------------------------------


def torch_batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}
    batch["label"] = torch.randint(0, C, (n,), generator=g)
    return batch


@pytest.mark.parametrize("combine", ["mean", "vote"])
def test_late_fusion_heads(combine):
    torch.manual_seed(0)
    model = LateFusionHeads(DIMS, C, combine=combine, hidden=16)
    assert model.name == f"decision/{combine}" and fusion_module_params(model) == 0
    batch = torch_batch()
    out = model(batch)
    assert out.shape == (8, C) and torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(8))
    # gradient reaches every head
    batch["depth_mask"] = torch.tensor([True, False] * 4)
    model.loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the loss averages each head's CE over the samples where its modality is present
    with torch.no_grad():
        logits, present = model.modality_logits(batch)
        by_hand = torch.stack([
            torch.nn.functional.cross_entropy(lg[p], batch["label"][p]) for lg, p in zip(logits, present)
        ]).mean()
        torch.testing.assert_close(model.loss(batch), by_hand)
        full = model(torch_batch())
        absent = model({k: v for k, v in torch_batch().items() if k != "image"})
        assert torch.isfinite(absent).all() and not torch.allclose(absent, full)
        assert torch.isfinite(model({"label": batch["label"]})).all()
    with pytest.raises(ValueError, match="combine"):
        LateFusionHeads(DIMS, C, combine="stacking")


# -- learnability: a task only the joint representation can solve ----------------------------------


def xor_task(n: int, seed: int) -> dict[str, np.ndarray]:
    """label = sign(image[:, 0]) XOR sign(depth[:, 0]); each modality alone is independent of it."""
    rng = np.random.default_rng(seed)
    s = rng.choice([-1.0, 1.0], size=(n, 2))
    data = {m: rng.normal(size=(n, 4)).astype(np.float32) for m in DIMS}  # text: pure noise
    data["image"][:, 0] = s[:, 0] + 0.2 * rng.normal(size=n)
    data["depth"][:, 0] = s[:, 1] + 0.2 * rng.normal(size=n)
    data["label"] = (s[:, 0] != s[:, 1]).astype(np.int64)
    return data


def train_module(model: torch.nn.Module, data: dict[str, np.ndarray], steps: int = 200) -> None:
    batch = {k: torch.as_tensor(v) for k, v in data.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()


def test_feature_level_beats_every_decision_level_on_complementary_task():
    train, test = xor_task(400, seed=0), xor_task(400, seed=1)
    dims = {m: 4 for m in DIMS}
    y_test = test["label"]
    test_t = {k: torch.as_tensor(v) for k, v in test.items()}

    feature_acc = {}
    for op in ("concat", "lmf"):  # lmf: its low-rank factors must train for this to work
        torch.manual_seed(0)
        feature = build_fusion(f"feature/{op}", in_dims=dims, num_classes=2, embed_dim=16, hidden=32)
        train_module(feature, train)
        feature_acc[op] = float((feature.predict_proba(test_t).argmax(1).numpy() == y_test).mean())

    decision_acc = {}
    for name in DECISION_NAMES:
        model = build_fusion(name, in_dims=dims, num_classes=2).fit(train)
        decision_acc[name] = float((model.predict(test) == y_test).mean())
    for combine in ("mean", "vote"):
        torch.manual_seed(0)
        heads = LateFusionHeads(dims, 2, combine=combine, hidden=32)
        train_module(heads, train)
        decision_acc[f"heads/{combine}"] = float((heads.predict_proba(test_t).argmax(1).numpy() == y_test).mean())

    assert min(feature_acc.values()) > 0.9, feature_acc
    assert max(decision_acc.values()) < 0.65, decision_acc  # chance is 0.5
    assert min(feature_acc.values()) > max(decision_acc.values()) + 0.25
