"""Adding a part = one file + its registration line. A module file dropped into ``align/`` or ``fusion/`` (here: a
temporary directory put on the package's ``__path__``) is found by the registry on lookup, with no list to edit,
and runs through its runner; a user's own module registers parts through ``plugins:`` / ``$ALIGNFUSE_PLUGINS``
without touching the toolkit; modules that only mention a registry in comments or strings are not imported."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fusion
from align.base import ALIGNERS
from align.connectors import CONNECTORS
from align.registry import Registry
from experiments.config import ConfigError
from experiments.runners import align as align_runner
from experiments.runners import fusion as fusion_runner

pytestmark = pytest.mark.usefixtures("one_thread")

ALIGNER_FILE = '''
"""A toy aligner: the whole file a newcomer writes."""
import torch
import torch.nn.functional as F
from torch import nn

from align.base import ALIGNERS, GradientAligner


@ALIGNERS.register("{name}")
class OneFileAligner(GradientAligner):
    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 8) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {{embed_dim}}")
        self.image_map, self.text_map = nn.Linear(image_dim, embed_dim), nn.Linear(text_dim, embed_dim)

    def encode(self, modality, x):
        return F.normalize((self.image_map if modality == "image" else self.text_map)(x.float()), dim=-1)

    def loss(self, batch):
        logits = self.encode("image", batch["image"]) @ self.encode("text", batch["text"]).T / 0.1
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
'''

FUSION_FILE = '''
import torch
from torch import nn

from fusion._common import FusionModule
from fusion.base import FUSIONS


@FUSIONS.register("feature/{op}")
class OneFileMean(FusionModule):
    level, operator = "feature", "{op}"

    def __init__(self, in_dims, num_classes: int, embed_dim: int = 8) -> None:
        super().__init__()
        self.modalities, self.num_classes = tuple(in_dims), num_classes
        self.encoders = nn.ModuleDict({{m: nn.Linear(d, embed_dim) for m, d in in_dims.items()}})
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, inputs):
        zs = [self.encoders[m](torch.as_tensor(inputs[m]).float()) for m in self.modalities
              if inputs.get(m) is not None]
        return self.head(torch.stack(zs).mean(0))
'''

CONNECTOR_FILE = '''
from torch import nn

from align.connectors import CONNECTORS, Connector


@CONNECTORS.register("{name}")
class OneFileConnector(Connector, nn.Linear):
    name = "{name}"

    def __init__(self, vision_dim: int, lm_dim: int) -> None:
        super().__init__(vision_dim, lm_dim)
        self.vision_dim, self.lm_dim = vision_dim, lm_dim
'''


@pytest.fixture
def drop_in(tmp_path, monkeypatch):
    """``drop_in(package, module_name, source)``: put one file into ``package`` (via its ``__path__``), undone
    after the test (module, path entry and whatever the file registered)."""
    added: list[tuple[str, str]] = []
    registries = (ALIGNERS, fusion.FUSIONS, CONNECTORS)
    before = {id(r): dict(r._entries) for r in registries}

    def put(package: str, module: str, source: str) -> Path:
        d = tmp_path / f"extra_{package}"
        d.mkdir(exist_ok=True)
        f = d / f"{module}.py"
        f.write_text(textwrap.dedent(source))
        pkg = sys.modules[package]
        if str(d) not in pkg.__path__:
            monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(d)])
        added.append((package, module))
        return f

    yield put
    for package, module in added:
        sys.modules.pop(f"{package}.{module}", None)
    for r in registries:
        r._entries.clear()
        r._entries.update(before[id(r)])
        r._scanned = {m for m in r._scanned if not any(m == f"{p}.{n}" for p, n in added)}


def _digits_align_raw(out: Path, aligners: dict) -> dict:
    return {"data": {"name": "digits", "view": "halves", "image_size": 16, "max_eval_images": 40},
            "seeds": [0], "aligners": aligners, "out_dir": str(out),
            "train": {"max_steps": 20, "batch_size": 64, "progress": False, "warmup_steps": 0}}


def test_registry_discovers_public_modules_that_name_it(tmp_path, monkeypatch):
    pkg = tmp_path / "zz_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from align.registry import Registry\n"
                                     "THINGS = Registry('thing', package='zz_pkg', symbol='THINGS')\n")
    (pkg / "a.py").write_text("from zz_pkg import THINGS\n\n@THINGS.register('a')\ndef a():\n    return 'a'\n")
    (pkg / "b.py").write_text("# not a part: only mentions THINGS in a comment\nIMPORTED = True\n"
                              "'THINGS.register(\"b\")'\n")
    (pkg / "_private.py").write_text("from zz_pkg import THINGS\n\n@THINGS.register('p')\ndef p():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import zz_pkg

        assert zz_pkg.THINGS.names() == ["a"] and zz_pkg.THINGS.build("a") == "a"
        assert "zz_pkg.b" not in sys.modules and "zz_pkg._private" not in sys.modules
        # a file added later is found on the lookup of its name (rescan), with no list to edit
        (pkg / "c.py").write_text("import zz_pkg as z\n\n@z.THINGS.register('c')\nclass C:\n    pass\n")
        assert "c" in zz_pkg.THINGS and zz_pkg.THINGS.names() == ["a", "c"]
        with pytest.raises(KeyError, match="unknown thing 'd'; known things: a, c"):
            zz_pkg.THINGS.get("d")
    finally:
        for m in [m for m in sys.modules if m == "zz_pkg" or m.startswith("zz_pkg.")]:
            del sys.modules[m]


def test_registry_rejects_a_second_part_under_one_name():
    def first():
        return 1

    def second():
        return 2

    reg = Registry("thing")
    reg.register("x")(first)
    with pytest.raises(ValueError, match=r"thing 'x' is already registered \(by .*first\); .*second registers it"):
        reg.register("x")(second)
    reg.register("x")(first)  # the same definition again (its module imported a second time): kept, no error
    assert reg.get("x") is first
    with pytest.raises(ValueError, match="package and symbol"):
        Registry("thing", package="align")


def test_an_aligner_file_dropped_into_align_runs_through_the_runner(tmp_path, drop_in):
    drop_in("align", "zz_onefile_aligner", ALIGNER_FILE.format(name="zz_onefile"))
    assert "zz_onefile" in ALIGNERS  # no edit anywhere else: found by discovery
    res = align_runner.run(align_runner.load(_digits_align_raw(tmp_path / "run", {"zz_onefile": {"embed_dim": 6}})))
    r = res["aligners"]["zz_onefile"]
    assert r["params_trained"] == 2 * (32 * 6 + 6) and r["rsum"] > 6 * res["chance"]["text_to_image_R@1"]


def test_a_fusion_file_dropped_into_fusion_runs_through_the_runner(tmp_path, drop_in):
    drop_in("fusion", "zz_onefile_fusion", FUSION_FILE.format(op="zz_onefile_mean"))
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    np.savez(tmp_path / "v.npz", left=rng.normal(size=(90, 4)) + y[:, None], right=rng.normal(size=(90, 5)),
             labels=y)
    raw = {"data": {"name": "multiview", "path": str(tmp_path / "v.npz")}, "seeds": [0],
           "out_dir": str(tmp_path / "o"), "strategies": {"feature/zz_onefile_mean": {"embed_dim": 4}},
           "train": {"max_steps": 40, "batch_size": 32}, "robustness": {"rates": [0.0, 1.0]}, "latency_samples": 2}
    res = fusion_runner.run(fusion_runner.load(raw))
    e = res["tasks"]["multiview"]["feature/zz_onefile_mean"]
    assert e["accuracy"] > 50.0 and e["params"] == (4 * 4 + 4) + (5 * 4 + 4) + (4 * 3 + 3)


def test_a_connector_file_dropped_into_align_is_registered_and_built(drop_in):
    from align.connectors import build_connector

    drop_in("align", "zz_onefile_connector", CONNECTOR_FILE.format(name="zz_onefile_linear"))
    conn = build_connector("zz_onefile_linear", vision_dim=3, lm_dim=5)
    assert "zz_onefile_linear" in CONNECTORS.names() and conn.weight.shape == (5, 3)
    assert dict(conn.config)["name"] == "zz_onefile_linear"


@pytest.mark.parametrize("how", ["module", "file", "env"])
def test_a_users_own_module_registers_parts_through_plugins(tmp_path, monkeypatch, drop_in, how):
    name = f"zz_plugin_{how}"
    src = tmp_path / f"my_parts_{how}.py"
    src.write_text(textwrap.dedent(ALIGNER_FILE.format(name=name)))
    raw = _digits_align_raw(tmp_path / "run", {name: {"embed_dim": 5}})
    if how == "module":
        monkeypatch.syspath_prepend(str(tmp_path))
        raw["plugins"] = [src.stem]
    elif how == "file":
        raw["plugins"] = [str(src)]
    else:
        monkeypatch.setenv("ALIGNFUSE_PLUGINS", str(src))
    try:
        cfg = align_runner.load(raw)
        assert cfg.plugins == [src.stem if how == "module" else str(src)]
        res = align_runner.run(cfg)
        assert res["aligners"][name]["params_trained"] == 2 * (32 * 5 + 5)
    finally:
        for m in [m for m in sys.modules if "my_parts_" in m]:
            del sys.modules[m]
        ALIGNERS._entries.pop(name, None)


def test_a_plugin_that_does_not_import_fails_at_validation_naming_the_key(tmp_path):
    raw = _digits_align_raw(tmp_path, {"cca": {"n_components": 2}})
    with pytest.raises(ConfigError, match=r"plugins: .*zz_no_such_module"):
        align_runner.load({**raw, "plugins": ["zz_no_such_module"]})
    bad = tmp_path / "broken_parts.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"plugins: .*broken_parts.py.*RuntimeError: boom"):
        align_runner.load({**raw, "plugins": [str(bad)]})
