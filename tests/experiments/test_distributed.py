"""Two gloo processes against one process on the same global batch.

The math being checked (W ranks, local batch b, global batch N = W*b, DDP averages
gradients over ranks, ``torch.distributed.nn.all_gather`` sums the gradients of the
gathered copies back onto their owner in backward):

* ``local_loss=False, gather_with_grad=True``: every rank computes the full-batch loss
  L(f_1..f_W). The gradient reaching rank r's own features is sum_s dL/df_r = W dL/df_r
  (W identical losses), so the DDP average (1/W) sum_r W dL/df_r df_r/dθ = dL/dθ; the
  logit scale, used directly on every rank, gets (1/W) sum_r dL/dt = dL/dt. Per-rank loss
  equals the single-process loss.
* ``local_loss=True, gather_with_grad=True``: rank r computes L_r, the loss of its own b rows
  against all N columns; the single-process loss is L = (1/W) sum_r L_r. Rank r's features
  get sum_s dL_s/df_r, and the DDP average is (1/W) d(sum_s L_s)/dθ = dL/dθ again. The
  per-rank losses differ from L; their mean equals it.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from experiments import distributed as D
from experiments.trainer import LossModule, TrainConfig, Trainer

# open_clip gathers with torch.distributed.nn.all_gather, which torch now flags as deprecated
_GATHER_WARNING = "torch.distributed.nn.functional.all_gather is deprecated"
pytestmark = pytest.mark.filterwarnings(f"ignore:{_GATHER_WARNING}:FutureWarning")

N, B_LOCAL, WORLD = 8, 4, 2
D_IMG, D_TXT, D_EMB = 6, 7, 5


class TinyClip(nn.Module):
    """Two linear towers + learnable temperature, trained with open_clip's ClipLoss."""

    def __init__(self, local_loss: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(D_IMG, D_EMB)
        self.text = nn.Linear(D_TXT, D_EMB)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.local_loss = local_loss
        self.set_distributed(0, 1)

    def set_distributed(self, rank: int, world_size: int) -> None:
        from open_clip.loss import ClipLoss

        self.clip_loss = ClipLoss(local_loss=self.local_loss, gather_with_grad=True, rank=rank, world_size=world_size)

    def loss(self, batch: dict) -> torch.Tensor:
        img = nn.functional.normalize(self.image(batch["image"]), dim=-1)
        txt = nn.functional.normalize(self.text(batch["text"]), dim=-1)
        return self.clip_loss(img, txt, self.logit_scale.exp())


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return {"image": torch.randn(N, D_IMG, generator=g), "text": torch.randn(N, D_TXT, generator=g)}


def _trainer_config(out_dir, batch_size: int) -> TrainConfig:
    return TrainConfig(max_steps=3, batch_size=batch_size, lr=0.05, weight_decay=0.1, warmup_steps=1,
                       log_every=1, save_every=1, eval_every=3, out_dir=out_dir, progress=False, seed=3)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # first, before any op: forked from a parent that may have used OpenMP
    warnings.filterwarnings("ignore", message=_GATHER_WARNING, category=FutureWarning)
    info = D.init_distributed(backend="gloo", timeout_s=120)
    assert info == D.world_info() == (rank, WORLD, rank)
    assert D.is_main_process() == (rank == 0)
    data = _data()
    results: dict = {}
    for local_loss in (False, True):
        model = TinyClip(local_loss)
        model.set_distributed(rank, WORLD)
        ddp = nn.parallel.DistributedDataParallel(LossModule(model))
        shard = {k: v[rank * B_LOCAL:(rank + 1) * B_LOCAL] for k, v in data.items()}
        loss = ddp(shard)
        loss.backward()
        results[local_loss] = {
            "losses": torch.tensor(D.all_gather_objects(loss.item())),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        }
    model = TinyClip(local_loss=True)
    res = Trainer(_trainer_config(os.path.join(out, "ddp"), B_LOCAL),
                  evaluator=lambda m: {"rsum": float(m.logit_scale)}).fit(model, data)
    if rank == 0:
        torch.save({"grad_check": results, "state": model.state_dict(), "history": res.history},
                   os.path.join(out, "rank0.pt"))
    D.destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def test_world_info_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() == D.world_info() == (0, 1, 0)
    assert D.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(t) is t and D.all_gather_objects("x") == ["x"] and D.broadcast_object(5) == 5


def test_init_distributed_needs_master_address(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_distributed()


def test_two_gloo_processes_match_one_process(tmp_path):
    data = _data()
    # single-process references first: the forked workers then inherit the warm imports
    ref_loss, ref_grads = {}, {}
    for local_loss in (False, True):
        model = TinyClip(local_loss)
        full = model.loss(data)
        full.backward()
        ref_loss[local_loss] = full.detach()
        ref_grads[local_loss] = {n: p.grad.clone() for n, p in model.named_parameters()}
    single = TinyClip(local_loss=True)
    res = Trainer(_trainer_config(tmp_path / "single", N), evaluator=lambda m: {"rsum": float(m.logit_scale)}
                  ).fit(single, data)

    _spawn(tmp_path)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)

    for local_loss in (False, True):
        full = ref_loss[local_loss]
        rank_losses = got["grad_check"][local_loss]["losses"]
        if local_loss:
            # each rank's loss covers its own rows only; their mean is the full-batch loss
            assert not torch.allclose(rank_losses, full.expand(WORLD))
            torch.testing.assert_close(rank_losses.mean(), full, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(rank_losses, full.expand(WORLD), rtol=1e-6, atol=1e-6)
        # DDP-averaged gradients equal the single-process full-batch gradients (module docstring)
        for name, grad in ref_grads[local_loss].items():
            torch.testing.assert_close(got["grad_check"][local_loss]["grads"][name], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"local_loss={local_loss} {name}: {m}")

    # the Trainer under DDP (batch 4 per process) follows the single-process run with batch 8
    for name, value in single.state_dict().items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-6)
    ddp_train = [r for r in got["history"] if r["kind"] == "train"]
    single_train = [r for r in res.history if r["kind"] == "train"]
    assert [r["step"] for r in ddp_train] == [1, 2, 3]
    for a, b in zip(ddp_train, single_train):  # logged loss = mean over ranks = full-batch loss
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"])

    # only rank 0 wrote files: one record per step (not two), checkpoint with both ranks' RNG states
    lines = [json.loads(s) for s in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == WORLD and len(ckpt["rng"]) == WORLD and ckpt["state"]["step"] == 3
