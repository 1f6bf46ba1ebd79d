"""The Trainer's loop state and files: :class:`_State` (everything ``last.pt`` holds about the loop position),
saving and restoring ``last.pt`` exactly (RNG states of every rank included), ``metrics.jsonl`` and TensorBoard
records, and the first-Ctrl-C handler that stops at a step boundary with a checkpoint."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments import distributed as D
from experiments.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, seed_everything, set_rng_state
from experiments.trainer.config import CHECKPOINT_FORMAT, TRAJECTORY_FIELDS as _TRAJECTORY_FIELDS

log = logging.getLogger("experiments.trainer")


@dataclass
class _State:
    """Loop position and bookkeeping; all of it goes into ``last.pt``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (per rank)
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    last_metrics: dict[str, float] | None = None
    seconds_before: float = 0.0  # wall time of earlier sessions
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["history"]  # lives in metrics.jsonl
        return d


class _StopOnSigint:
    """While installed (main thread only), the first Ctrl-C sets ``requested`` so the loop stops at the next step
    boundary and writes ``last.pt``; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _epochs_done(state: _State, n_batches: int) -> float:
    return round(state.epoch + state.batch_in_epoch / n_batches, 4)



class CheckpointMixin:
    """``last.pt`` / ``metrics.jsonl`` / TensorBoard methods of :class:`experiments.trainer.Trainer`."""

    config: Any

    def _save_last(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, state: _State, elapsed: float,
                   info: D.WorldInfo) -> None:
        rng = D.all_gather_objects(get_rng_state())  # collective: every rank takes part
        if info.rank != 0:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "kind": "last",
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": {**state.to_dict(), "seconds_before": elapsed},
            "rng": rng,
            "world_size": info.world_size,
            "config": self.config.to_dict(),
        }
        save_checkpoint(ckpt, path)

    def _restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, state: _State, info: D.WorldInfo) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != "last":
            raise ValueError(f"{path} is not a resumable checkpoint (kind={ckpt.get('kind')!r})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for k, v in ckpt["state"].items():
            setattr(state, k, v)
        old, new = {**ckpt["config"], "world_size": ckpt["world_size"]}, {**self.config.to_dict(),
                                                                           "world_size": info.world_size}
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in (*_TRAJECTORY_FIELDS, "world_size")
                   if old.get(k) != new[k]]
        if changed and info.rank == 0:
            log.warning("resuming %s with a different setup, the run will not match an uninterrupted one: %s",
                        path, "; ".join(changed))
        if len(ckpt["rng"]) > info.rank:
            set_rng_state(ckpt["rng"][info.rank])
        else:
            seed_everything(self.config.seed + info.rank + 1_000_003 * state.step)
        (log.info if info.rank == 0 else log.debug)("resuming from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch,
                 state.batch_in_epoch)

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
        """Keep the records up to ``step`` (later ones were written after the checkpoint); return them."""
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = [r for r in records if r["step"] <= step]
        from align.weights import write_file_atomically

        write_file_atomically(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
        return records

    @staticmethod
    def _write_record(out_dir: Path | None, writer: Any, rec: dict[str, Any]) -> None:
        if out_dir is not None:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if writer is not None:
            for k, v in rec.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    writer.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    @staticmethod
    def _tensorboard(out_dir: Path | None) -> Any:
        if out_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(str(out_dir / "tb"))
