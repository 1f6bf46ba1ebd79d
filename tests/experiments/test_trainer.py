"""The shared Trainer: optimiser groups, schedule, accumulation, clipping, freezing, evaluation,
early stopping, metrics log, closed-form path, loss dicts."""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from experiments.trainer import DictDataset, TrainConfig, Trainer, param_groups


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, lr=0.1, weight_decay=0.0, progress=False, log_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


def _linear_data(n: int = 16, d: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return {"x": x, "y": x @ torch.arange(1.0, d + 1) + 0.5}


class LinReg(nn.Module):
    def __init__(self, d: int = 3, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, 1)
        self.scale = scale

    def loss(self, batch):
        return self.scale * ((self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


# ---------------------------------------------------------------- optimiser and schedule

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.zeros(1, 1))  # 2-D, excluded by name
        self.proj = nn.Parameter(torch.randn(4, 4))  # excluded through no_weight_decay()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"proj"}


def test_param_groups_no_decay_rule():
    model = Mixed()
    groups = {g["group"]: g for g in Trainer(_cfg(weight_decay=0.3)).configure_optimizer(model).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups["decay"]["params"])
    no_decay = sorted(names[id(p)] for p in groups["no_decay"]["params"])
    assert decay == ["emb.weight", "lin.weight"]
    assert no_decay == ["lin.bias", "logit_bias", "logit_scale", "norm.bias", "norm.weight", "proj"]
    assert groups["decay"]["weight_decay"] == 0.3 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)) == 0


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The intended schedule, written out: (s + 1) / warmup during warm-up, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def test_warmup_cosine_values():
    f = lambda s: warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert warmup_cosine(0, 0, 10) == 1.0 and warmup_cosine(10, 0, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_logged_lr_follows_the_schedule(warmup):
    res = Trainer(_cfg(max_steps=10, warmup_steps=warmup, min_lr_ratio=0.2)).fit(LinReg(), _linear_data())
    lrs = [r["lr"] for r in res.history if r["kind"] == "train"]
    expected = [0.1 * warmup_cosine(s, warmup, 10, 0.2) for s in range(10)]  # step s+1 runs at factor(s)
    assert lrs == pytest.approx(expected)


# ---------------------------------------------------------------- accumulation, clipping, freezing

def test_grad_accumulation_equals_larger_batch():
    data = _linear_data(16)
    a, b = LinReg(), LinReg()
    Trainer(_cfg(max_steps=4, batch_size=4, grad_accum=2)).fit(a, data)
    Trainer(_cfg(max_steps=4, batch_size=8, grad_accum=1)).fit(b, data)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6, msg=name)
    c = LinReg()  # control: the same number of steps on half the data differs
    Trainer(_cfg(max_steps=4, batch_size=4, grad_accum=1)).fit(c, data)
    assert not torch.allclose(c.lin.weight, b.lin.weight)


class NormSpy(Trainer):
    """Records the total gradient norm the optimiser sees at each step."""

    def configure_optimizer(self, model):
        opt = super().configure_optimizer(model)
        self.norms = []
        opt.register_step_pre_hook(lambda o, args, kwargs: self.norms.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in o.param_groups for p in g["params"]])).item()))
        return opt


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_clipping_applied(clip):
    trainer = NormSpy(_cfg(max_steps=3, grad_clip=clip))
    res = trainer.fit(LinReg(scale=100.0), _linear_data())
    if clip is None:
        assert min(trainer.norms) > 10 * 0.5 and "grad_norm" not in res.history[0]
    else:
        assert max(trainer.norms) <= clip * (1 + 1e-5)
        logged = [r["grad_norm"] for r in res.history if r["kind"] == "train"]
        assert min(logged) > 10 * clip  # the log shows the norm before clipping


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 8)
        self.head = nn.Linear(8, 1)

    def loss(self, batch):
        return ((self.head(torch.relu(self.body(batch["x"]))).squeeze(-1) - batch["y"]) ** 2).mean()


def test_frozen_parameters_untouched_and_counted(caplog):
    model = TwoLayer()
    model.body.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="experiments.trainer"):
        res = Trainer(_cfg(max_steps=3, weight_decay=0.5)).fit(model, _linear_data())
    for k in ("body.weight", "body.bias"):
        assert torch.equal(model.state_dict()[k], before[k])
    assert not torch.equal(model.head.weight, before["head.weight"])
    assert (res.n_trainable, res.n_frozen) == (9, 32)
    assert "9 trainable parameters (32 frozen)" in caplog.text


def test_bf16_request_falls_back_to_fp32_on_cpu(caplog):
    model = TwoLayer()
    with caplog.at_level(logging.WARNING, logger="experiments.trainer"):
        Trainer(_cfg(max_steps=1, precision="bf16", device="cpu")).fit(model, _linear_data())
    assert "needs a CUDA device" in caplog.text and model.head.weight.dtype == torch.float32


# ---------------------------------------------------------------- evaluation, best checkpoint, early stopping

class Scripted:
    """Evaluator returning a fixed sequence of rsum values; snapshots the weights it saw."""

    def __init__(self, values):
        self.values, self.calls, self.snapshots = list(values), [], {}

    def __call__(self, model):
        assert not getattr(model, "training", False) and not torch.is_grad_enabled()
        value = self.values[len(self.calls)]
        self.calls.append(value)
        if isinstance(model, nn.Module):
            self.snapshots[len(self.calls)] = copy.deepcopy(model.state_dict())
        return {"rsum": value, "other": -value}


@pytest.mark.parametrize("mode, best_eval, stop_step", [("max", 2, 8), ("min", 1, 6)])
def test_eval_every_best_checkpoint_and_early_stopping(tmp_path, mode, best_eval, stop_step):
    ev = Scripted([1.0, 3.0, 2.0, 2.5, 9.0, 9.0])
    model = TwoLayer()
    res = Trainer(_cfg(max_steps=20, eval_every=2, early_stopping_patience=2, mode=mode, out_dir=tmp_path,
                       lr=0.01), evaluator=ev).fit(model, _linear_data())
    assert model.training
    assert res.stopped_early and res.steps == stop_step
    assert [r["step"] for r in res.history if r["kind"] == "eval"] == list(range(2, stop_step + 1, 2))
    assert res.best_step == 2 * best_eval and res.best_metrics["rsum"] == ev.calls[best_eval - 1]
    assert res.final_metrics == {"rsum": ev.calls[-1], "other": -ev.calls[-1]}
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == res.best_step and best["metrics"] == res.best_metrics
    for k, v in ev.snapshots[best_eval].items():
        assert torch.equal(best["model"][k], v)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["state"]["step"] == stop_step


def test_final_evaluation_without_eval_every_and_missing_monitor():
    ev = Scripted([5.0])
    res = Trainer(_cfg(max_steps=3), evaluator=ev).fit(TwoLayer(), _linear_data())
    assert len(ev.calls) == 1 and res.final_metrics["rsum"] == 5.0 and res.best_step == 3
    with pytest.raises(KeyError, match="'recall'.*'other', 'rsum'"):
        Trainer(_cfg(max_steps=1, monitor="recall"), evaluator=Scripted([1.0])).fit(TwoLayer(), _linear_data())


# ---------------------------------------------------------------- metrics log, loss dicts

class TwoTerms(TwoLayer):
    def __init__(self, with_total: bool):
        super().__init__()
        self.with_total = with_total

    def loss(self, batch):
        mse = super().loss(batch)
        reg = 0.1 * self.head.weight.pow(2).sum()
        return {"loss": mse, "mse": mse, "reg": reg} if self.with_total else {"mse": mse, "reg": reg}


@pytest.mark.parametrize("with_total", [False, True])
def test_dict_loss_terms_logged(with_total):
    res = Trainer(_cfg(max_steps=4, log_every=2)).fit(TwoTerms(with_total), _linear_data())
    recs = [r for r in res.history if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        expected = r["mse"] if with_total else r["mse"] + r["reg"]
        assert r["reg"] > 0 and r["loss"] == pytest.approx(expected)


def test_metrics_jsonl_records(tmp_path):
    res = Trainer(_cfg(max_steps=6, log_every=2, eval_every=3, out_dir=tmp_path), evaluator=Scripted([1.0, 2.0])
                  ).fit(TwoLayer(), _linear_data(10))  # 3 batches per epoch
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == res.history
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 2), ("eval", 3), ("train", 4), ("train", 6),
                                                       ("eval", 6)]
    for r in lines:
        assert set(r) >= {"step", "epoch", "elapsed"}
        if r["kind"] == "train":
            assert set(r) == {"kind", "step", "epoch", "lr", "loss", "elapsed"}
    assert [r["epoch"] for r in lines if r["kind"] == "train"] == pytest.approx([2 / 3, 4 / 3, 2.0], abs=1e-4)


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    Trainer(_cfg(max_steps=2, eval_every=2, out_dir=tmp_path), evaluator=Scripted([1.0])).fit(TwoLayer(),
                                                                                            _linear_data())
    assert ("train/loss", 1) in scalars and ("train/lr", 2) in scalars and ("eval/rsum", 2) in scalars
    assert scalars[-1] == ("closed", None)


def test_no_files_without_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Trainer(_cfg(max_steps=2, save_every=1, eval_every=1), evaluator=Scripted([1.0, 2.0])).fit(TwoLayer(),
                                                                                              _linear_data())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- data inputs

class Captioned(Dataset):
    """Dict samples with a string field, collated by the default collate into a list of str."""

    def __init__(self):
        self.data = _linear_data(12)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"x": self.data["x"][i], "y": self.data["y"][i], "text": f"caption {i}"}


class SeesText(TwoLayer):
    def loss(self, batch):
        assert isinstance(batch["text"], list) and all(t.startswith("caption") for t in batch["text"])
        self.seen = getattr(self, "seen", 0) + len(batch["text"])
        return super().loss(batch)


def test_dataset_of_dicts_and_numpy_dict():
    model = SeesText()
    res = Trainer(_cfg(epochs=2, batch_size=5)).fit(model, Captioned())  # 3 batches per epoch: 5, 5, 2
    assert res.steps == 6 and model.seen == 24
    data = {k: v.numpy() for k, v in _linear_data(12).items()}
    data["text"] = [f"caption {i}" for i in range(12)]
    model = SeesText()
    res = Trainer(_cfg(epochs=1, batch_size=4, drop_last=True)).fit(model, data)
    assert res.steps == 3 and model.seen == 12


def test_dict_dataset_length_mismatch_names_keys():
    with pytest.raises(ValueError, match=r"'image': 5, 'text': 4"):
        DictDataset({"image": np.zeros((5, 2)), "text": np.zeros((4, 2))})
    with pytest.raises(ValueError, match=r"'image': 5, 'text': 4"):
        Trainer(_cfg()).fit(LinReg(), {"image": np.zeros((5, 2)), "text": np.zeros((4, 2))})


def test_bad_config_and_bad_model():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="maximise")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(TypeError, match="neither an nn.Module"):
        Trainer(_cfg()).fit(object(), _linear_data())


# ---------------------------------------------------------------- closed-form path

class FakeCCA:
    """A closed-form aligner: fit(X, Y) and no loss."""

    modalities = ("image", "text")

    def fit(self, x, y):
        self.fit_args = (x, y)
        self.mean_ = x.mean(0)
        return self

    def encode(self, modality, x):
        return torch.as_tensor(x)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_closed_form_path_calls_fit_then_evaluates_once(tmp_path, as_dataset):
    g = np.random.default_rng(0)
    data = {"image": g.normal(size=(10, 3)).astype(np.float32), "text": g.normal(size=(10, 2)).astype(np.float32),
            "label": np.arange(10)}
    train = DictDataset(data) if as_dataset else data
    if as_dataset:  # a plain Dataset: gathered through a DataLoader, in order
        train = torch.utils.data.Subset(train, range(10))
    model, ev = FakeCCA(), Scripted([7.0])
    res = Trainer(_cfg(batch_size=3, out_dir=tmp_path), evaluator=ev).fit(model, train)
    x, y = model.fit_args
    assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
    np.testing.assert_array_equal(x, data["image"])
    np.testing.assert_array_equal(y, data["text"])
    assert ev.calls == [7.0] and res.final_metrics["rsum"] == 7.0 and res.steps == 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["rsum"] == 7.0
