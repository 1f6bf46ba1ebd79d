"""The spine end to end: a part registered here (one class + one registration line) runs through its runner with
no other edit; a run killed mid-training resumes to the same result as an uninterrupted one; ``load_aligner``
rebuilds a trained aligner; align runs on a Karpathy JSON / CSV of real image files built here."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion
from align.base import ALIGNERS, GradientAligner
from experiments.runners import align as align_runner
from experiments.runners import fusion as fusion_runner

pytestmark = pytest.mark.usefixtures("one_thread")


@ALIGNERS.register("zz_toy")
class ToyAligner(GradientAligner):
    """Two linear maps and a symmetric InfoNCE loss; ``fail_at`` (a global loss-call count) injects a crash."""

    calls = 0
    fail_at: int | None = None

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 8) -> None:
        super().__init__()
        self.image_map, self.text_map = nn.Linear(image_dim, embed_dim), nn.Linear(text_dim, embed_dim)

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((self.image_map if modality == "image" else self.text_map)(x.float()), dim=-1)

    def loss(self, batch: dict) -> torch.Tensor:
        ToyAligner.calls += 1
        if ToyAligner.fail_at is not None and ToyAligner.calls == ToyAligner.fail_at:
            raise RuntimeError("injected crash")
        logits = self.encode("image", batch["image"]) @ self.encode("text", batch["text"]).T / 0.1
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@fusion.FUSIONS.register("feature/zz_toy_max")
class ToyMaxFusion(fusion.FusionModule):
    """Element-wise max of per-modality linear encodings, then a linear head."""

    level, operator = "feature", "zz_toy_max"

    def __init__(self, in_dims: dict, num_classes: int, embed_dim: int = 8) -> None:
        super().__init__()
        self.modalities, self.num_classes = tuple(in_dims), num_classes
        self.encoders = nn.ModuleDict({m: nn.Linear(d, embed_dim) for m, d in in_dims.items()})
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, inputs: dict) -> torch.Tensor:
        n = fusion._common.batch_size(inputs, self.modalities)
        zs = [torch.where(fusion._common.presence(inputs, m, n)[:, None], self.encoders[m](
            torch.as_tensor(inputs[m]).float()), torch.full((n, self.head.in_features), -1e4))
              for m in self.modalities if inputs.get(m) is not None]
        return self.head(torch.stack(zs).amax(0).clamp_min(-10) if zs else torch.zeros(n, self.head.in_features))


def _align_raw(out, aligners, seeds=(0, 1), steps=20) -> dict:
    return {"data": {"name": "digits", "view": "halves", "image_size": 16, "max_eval_images": 40},
            "seeds": list(seeds), "aligners": aligners, "out_dir": str(out),
            "train": {"max_steps": steps, "batch_size": 64, "save_every": 5, "progress": False, "warmup_steps": 0}}


def test_toy_aligner_runs_through_the_align_runner_and_reloads(tmp_path):
    from experiments.runs import load_aligner, run_info

    ToyAligner.fail_at = None
    res = align_runner.run(align_runner.load(_align_raw(tmp_path, {"zz_toy": {"embed_dim": 6}}, seeds=(0,))))
    r = res["aligners"]["zz_toy"]
    assert r["rsum"] > res["chance"]["text_to_image_R@1"] * 6 and r["params_trained"] == 2 * (32 * 6 + 6)
    assert run_info(tmp_path)["units"] == ["zz_toy/seed0"]
    model = load_aligner(tmp_path, "zz_toy", seed=0)
    assert not model.training
    saved = np.load(tmp_path / "embeddings" / "zz_toy" / "image_emb.npy")
    from experiments.data import load_digits

    ds = load_digits(image_size=16)
    x = torch.from_numpy(np.asarray(ds.views["left"][ds.splits["test"][:40]], np.float32))
    np.testing.assert_allclose(model.encode("image", x).detach().numpy(), saved, atol=1e-6)


def test_toy_fusion_runs_through_the_fusion_runner(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    np.savez(tmp_path / "v.npz", left=rng.normal(size=(90, 4)) + y[:, None], right=rng.normal(size=(90, 5)),
             labels=y)
    raw = {"data": {"name": "multiview", "path": str(tmp_path / "v.npz")}, "seeds": [0], "out_dir": str(tmp_path / "o"),
           "strategies": {"feature/zz_toy_max": {"embed_dim": 4}}, "train": {"max_steps": 40, "batch_size": 32},
           "robustness": {"rates": [0.0, 1.0]}, "latency_samples": 2}
    res = fusion_runner.run(fusion_runner.load(raw))
    e = res["tasks"]["multiview"]["feature/zz_toy_max"]
    assert e["accuracy"] > 50.0 and e["params"] == (4 * 4 + 4) + (5 * 4 + 4) + (4 * 3 + 3)


def _strip_times(r):
    if isinstance(r, dict):
        return {k: _strip_times(v) for k, v in r.items() if "seconds" not in k and "latency" not in k
                and "throughput" not in k and k not in ("files",)}
    return r


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Crash mid-training in the second unit (seed 1, step 13; checkpoint every 5 steps), rerun the same config:
    the first unit is kept, the second continues from step 10, and every number equals an uninterrupted run."""
    aligners = {"zz_toy": {}, "cca": {"n_components": 4}}
    ToyAligner.fail_at, ToyAligner.calls = None, 0
    clean = align_runner.run(align_runner.load(_align_raw(tmp_path / "clean", aligners)))

    ToyAligner.calls, ToyAligner.fail_at = 0, 20 + 13
    raw = _align_raw(tmp_path / "run", aligners)
    with pytest.raises(RuntimeError, match="injected crash"):
        align_runner.run(align_runner.load(raw))
    units = tmp_path / "run" / "units" / "zz_toy"
    first = (units / "seed0" / "result.json").stat().st_mtime_ns
    assert not (units / "seed1" / "result.json").exists()
    assert torch.load(units / "seed1" / "last.pt", weights_only=True)["state"]["step"] == 10

    ToyAligner.fail_at, ToyAligner.calls = None, 0
    resumed = align_runner.run(align_runner.load(raw))
    assert ToyAligner.calls == 10  # only the 10 remaining steps of seed 1 ran
    assert (units / "seed0" / "result.json").stat().st_mtime_ns == first
    assert _strip_times(resumed["aligners"]) == _strip_times(clean["aligners"])


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    from experiments.trainer import TrainConfig, Trainer

    data = {"image": torch.randn(64, 5), "text": torch.randn(64, 4)}

    class Interrupting(ToyAligner):
        def loss(self, batch):
            if ToyAligner.calls == 7:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
            return super().loss(batch)

    cfg = TrainConfig(max_steps=12, batch_size=16, out_dir=str(tmp_path / "u"), progress=False, save_every=None)
    torch.manual_seed(0)
    ToyAligner.fail_at, ToyAligner.calls = None, 0
    model = Interrupting(5, 4)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 8"):
        Trainer(cfg).fit(model, data)
    assert torch.load(tmp_path / "u" / "last.pt", weights_only=True)["state"]["step"] == 8
    ToyAligner.calls = 100
    torch.manual_seed(0)
    resumed = ToyAligner(5, 4)
    Trainer(cfg).fit(resumed, data)
    torch.manual_seed(0)
    straight = ToyAligner(5, 4)
    Trainer(TrainConfig(max_steps=12, batch_size=16, progress=False)).fit(straight, data)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _images(folder, n):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = np.zeros((20, 24, 3), np.uint8)
        arr[:, :, i % 3] = 40 + 15 * i
        Image.fromarray(arr).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def test_karpathy_and_csv_caption_sets_run_with_no_code(tmp_path, monkeypatch):
    """``data.name=karpathy data.path=... data.image_root=...`` (splits from the file) and ``data.name=csv``; a
    stand-in frozen encoder keeps the test fast (the real ones are named the same way in ``encoders``)."""
    from experiments.features import ENCODERS, FrozenEncoder

    if "zz_mean_rgb" not in ENCODERS:
        @ENCODERS.register("zz_mean_rgb")
        class MeanRGB(FrozenEncoder):
            modality, kinds, default_kinds, name = "image", ("pooled",), ("pooled",), "zz_mean_rgb"
            dims = {"pooled": 3}

            def __init__(self, **kw):
                pass

            def encode(self, images, kinds=None):
                return {"pooled": np.asarray(images, np.float32).mean(axis=(1, 2))}

        @ENCODERS.register("zz_char_counts")
        class CharCounts(FrozenEncoder):
            modality, kinds, default_kinds, name = "text", ("pooled",), ("pooled",), "zz_char_counts"
            dims = {"pooled": 26}

            def __init__(self, **kw):
                pass

            def encode(self, texts, kinds=None):
                out = np.zeros((len(texts), 26), np.float32)
                for i, t in enumerate(texts):
                    for c in t.lower():
                        if "a" <= c <= "z":
                            out[i, ord(c) - 97] += 1
                return {"pooled": out}

    names = _images(tmp_path / "img", 12)
    words = ["apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel", "kiwi", "lemon", "mango", "olive"]
    split = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    doc = {"images": [{"filename": n, "split": s, "sentences": [{"raw": f"picture of {words[i]}"},
                                                                 {"raw": f"a {words[i]} in colour"}]}
                      for i, (n, s) in enumerate(zip(names, split))]}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    enc = {"image": "zz_mean_rgb", "text": "zz_char_counts"}
    base = {"seeds": [0], "aligners": {"cca": {"n_components": 2}, "zz_toy": {}}, "encoders": enc,
            "cache_dir": str(tmp_path / "cache"), "train": {"max_steps": 3, "batch_size": 8, "progress": False}}
    res = align_runner.run(align_runner.load({**base, "out_dir": str(tmp_path / "k"), "data": {
        "name": "karpathy", "path": str(tmp_path / "k.json"), "image_root": str(tmp_path / "img")}}))
    assert res["aligners"]["cca"]["n_test_images"] == 2 and res["data"]["name"] == "karpathy"
    rows = "".join(f"{n}\tpicture {words[i]}\n" for i, n in enumerate(names))
    (tmp_path / "c.tsv").write_text("filepath\ttitle\n" + rows)
    res = align_runner.run(align_runner.load({**base, "out_dir": str(tmp_path / "c"), "data": {
        "name": "csv", "path": str(tmp_path / "c.tsv"), "image_root": str(tmp_path / "img"), "image_size": 16}}))
    assert set(res["aligners"]) == {"cca", "zz_toy"} and res["aligners"]["zz_toy"]["n_test_images"] >= 1
