"""Checkpoints and resume: weights_only loading, NaN stops, and a run killed with SIGKILL that
resumes to the bit-identical weights of an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from experiments.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]


class DropNet(nn.Module):
    """A small MLP with dropout (so the RNG state matters); can fail at a chosen step."""

    def __init__(self, fail_at: int | None = None, fail_with: str = "nan"):
        super().__init__()
        torch.manual_seed(123)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.fail_at, self.fail_with, self.calls = fail_at, fail_with, 0

    def loss(self, batch):
        self.calls += 1
        mse = nn.functional.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])
        if self.calls == self.fail_at:
            if self.fail_with == "crash":
                raise RuntimeError("simulated crash")
            mse = mse * float("nan")
        return {"mse": mse, "l1": 0.01 * self.net[0].weight.abs().mean()}


def _data(n: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return {"x": x, "y": x.sum(1)}


def _cfg(out_dir, **kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=4, lr=1e-2, weight_decay=0.01, warmup_steps=2, log_every=1, progress=False,
                seed=7, out_dir=out_dir)
    return TrainConfig(**{**base, **kw})


def test_checkpoints_load_with_weights_only(tmp_path):
    model = DropNet()
    Trainer(_cfg(tmp_path, max_steps=3, eval_every=3), evaluator=lambda m: {"rsum": 1.0}).fit(model, _data())
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(last) >= {"model", "optimizer", "scheduler", "state", "rng", "config", "world_size"}
    assert last["state"]["step"] == 3 and last["config"]["batch_size"] == 4
    assert set(last["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    for k, v in model.state_dict().items():
        assert torch.equal(last["model"][k], v)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 3 and best["metrics"] == {"rsum": 1.0}


def test_resume_false_starts_over(tmp_path):
    Trainer(_cfg(tmp_path, max_steps=4)).fit(DropNet(), _data())
    res = Trainer(_cfg(tmp_path, max_steps=2)).fit(DropNet(), _data(), resume=False)
    assert res.steps == 2 and [r["step"] for r in res.history] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] == 2


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    save_checkpoint({"rng": get_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])
    assert [p.name for p in tmp_path.iterdir()] == ["rng.pt"]  # no temp file left behind


def test_nan_stops_with_message_and_checkpoints_intact(tmp_path):
    model = DropNet(fail_at=4)
    snapshots = {}

    def evaluator(m):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return {"rsum": float(len(snapshots))}

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4 \(mse=nan, l1=.*, loss=nan\)"):
        Trainer(_cfg(tmp_path, save_every=1, eval_every=1), evaluator=evaluator).fit(model, _data())
    last = load_checkpoint(tmp_path / "last.pt")
    best = load_checkpoint(tmp_path / "best.pt")
    assert last["state"]["step"] == 3 and best["step"] == 3
    for k, v in snapshots[3].items():  # the weights after step 3, not touched by the NaN step
        assert torch.equal(last["model"][k], v) and torch.equal(best["model"][k], v)
        assert torch.isfinite(last["model"][k]).all()
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 3


def test_resume_after_crash_in_process_is_bit_identical(tmp_path):
    ref = DropNet()
    ref_res = Trainer(_cfg(tmp_path / "ref")).fit(ref, _data())  # 8 batches per epoch, 24 steps
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_cfg(tmp_path / "run", save_every=5)).fit(DropNet(fail_at=13, fail_with="crash"), _data())
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 10  # mid-epoch 1
    model = DropNet()
    nn.init.zeros_(model.net[0].weight)  # whatever it holds is replaced by the checkpoint
    res = Trainer(_cfg(tmp_path / "run", save_every=5)).fit(model, _data())
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # metrics written after the checkpoint (steps 11, 12) were dropped and rewritten identically
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed"} for r in h]  # noqa: E731
    assert strip(res.history) == strip(ref_res.history)
    assert res.steps == 24


SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    from experiments.trainer import Trainer, TrainConfig

    out_dir, hang_at, init_seed, go_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    while go_file != "-" and not os.path.exists(go_file):  # started early to overlap the imports
        time.sleep(0.02)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
            self.calls = 0

        def loss(self, batch):
            self.calls += 1
            if self.calls == hang_at:
                time.sleep(60)  # stay here until the test kills us
            return nn.functional.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    torch.manual_seed(init_seed)  # model init: the resumed run must take its weights from last.pt
    model = Net()
    cfg = TrainConfig(epochs=3, batch_size=6, lr=1e-2, weight_decay=0.01, warmup_steps=2, save_every=1,
                      log_every=1, out_dir=out_dir, progress=False, seed=7)
    Trainer(cfg).fit(model, {"x": x, "y": x.sum(1)})
    torch.save(model.state_dict(), out_dir + "/final.pt")
""")


def _launch(script: Path, out_dir: Path, hang_at: int, init_seed: int, go_file: Path | None = None
            ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [str(out_dir), str(hang_at), str(init_seed), str(go_file or "-")]
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _last_step(out_dir: Path) -> int:
    try:
        return load_checkpoint(out_dir / "last.pt")["state"]["step"]
    except FileNotFoundError:
        return 0


def _run_in_process(script: Path, *args: str) -> None:
    argv, threads = sys.argv, torch.get_num_threads()
    try:
        sys.argv = [str(script), *args]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    go = tmp_path / "go"
    run = _launch(script, run_dir, hang_at=11, init_seed=1)  # hangs in step 11, after last.pt of step 10
    # a fresh process for the resume, other init (weights must come from last.pt); waits for `go`
    resumed = _launch(script, run_dir, hang_at=0, init_seed=2, go_file=go)
    try:
        # the uninterrupted reference (7 batches x 3 epochs = 21 steps), here while the subprocesses start
        _run_in_process(script, str(ref_dir), "0", "1", "-")
        deadline = time.monotonic() + 90
        while _last_step(run_dir) < 10:
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "the run never wrote the checkpoint of step 10"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
        ckpt = load_checkpoint(run_dir / "last.pt")
        assert (ckpt["state"]["step"], ckpt["state"]["epoch"], ckpt["state"]["batch_in_epoch"]) == (10, 1, 3)
        assert not (run_dir / "final.pt").exists()
        go.touch()
        out, _ = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, out
    finally:
        for proc in (run, resumed):
            if proc.poll() is None:
                proc.kill()

    final, expected = (torch.load(d / "final.pt", weights_only=True) for d in (run_dir, ref_dir))
    for k, v in expected.items():
        assert torch.equal(final[k], v), f"{k} differs after resume"
    run_log, ref_log = ([json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
                        for d in (run_dir, ref_dir))
    assert [(r["step"], r["lr"], r["loss"]) for r in run_log] == [(r["step"], r["lr"], r["loss"]) for r in ref_log]
    assert len(run_log) == 21 and all(math.isfinite(r["loss"]) for r in run_log)
