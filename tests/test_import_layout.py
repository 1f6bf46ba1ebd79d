"""Import layout: modules split for size keep their old import paths, parts register through discovery alone
(no trailing imports), and modules import on their own in a fresh interpreter (no import cycles)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (the test fails with its stderr if it fails)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("module", ["align.xattn", "align.kernel_cca"])
def test_module_imports_on_its_own(module):
    _fresh(f"import {module}")  # align.xattn was circular while align.connectors imported it at its end


def test_connectors_do_not_import_xattn():
    out = _fresh("import sys, align.connectors\nprint('align.xattn' in sys.modules)")
    assert out.strip() == "False"  # the dependency goes xattn -> connectors only


def test_gated_xattn_is_registered_by_discovery_and_keeps_its_old_import_path():
    import align.xattn
    from align.connectors import CONNECTORS, GatedXAttnBlock, GatedXAttnConnector

    assert GatedXAttnConnector is align.xattn.GatedXAttnConnector is CONNECTORS.get("gated_xattn")
    assert GatedXAttnBlock is align.xattn.GatedXAttnBlock
    with pytest.raises(AttributeError, match="no attribute 'GatedXAttn'"):
        import align.connectors

        align.connectors.GatedXAttn


def test_cca_modules_register_both_aligners_and_keep_align_cca_paths():
    import align
    import align.kernel_cca
    from align.base import ALIGNERS
    from align.cca import CCA, KernelCCA

    assert ALIGNERS.get("cca") is CCA is align.CCA
    assert ALIGNERS.get("kernel_cca") is KernelCCA is align.kernel_cca.KernelCCA is align.KernelCCA


def test_encoders_are_discovered_without_an_explicit_module_list():
    out = _fresh("import sys\nfrom experiments.encoders import ENCODERS\n"
                 "print('experiments.encoders_open_clip' in sys.modules)")
    assert out.strip() == "False"  # no trailing import: encoders_open_clip is found by discovery
    from experiments.encoders import ENCODERS
    from experiments.features import MiniLMEncoder, MobileNetV2Encoder, OpenClipImageEncoder, OpenClipTextEncoder

    assert {"mobilenet_v2", "minilm", "open_clip_image", "open_clip_text"} <= set(ENCODERS.names())
    assert ENCODERS.package == "experiments" and ENCODERS.symbol == "ENCODERS"
    for name, cls in [("mobilenet_v2", MobileNetV2Encoder), ("minilm", MiniLMEncoder),
                      ("open_clip_image", OpenClipImageEncoder), ("open_clip_text", OpenClipTextEncoder)]:
        assert ENCODERS.get(name) is cls


ENCODER_FILE = '''
import numpy as np

from experiments.encoders import ENCODERS, FrozenEncoder


@ENCODERS.register("zz_onefile_mean_rgb")
class MeanRGB(FrozenEncoder):
    name, modality, kinds, default_kinds, dims = "zz_onefile_mean_rgb", "image", ("pooled",), ("pooled",), {"pooled": 3}

    def encode(self, inputs, kinds=None):
        return {"pooled": np.asarray(inputs, dtype=np.float32).mean(axis=(1, 2))}
'''


def test_an_encoder_file_dropped_into_experiments_is_found(tmp_path, monkeypatch):
    import experiments
    from experiments.encoders import ENCODERS

    extra = tmp_path / "extra_experiments"
    extra.mkdir()
    (extra / "zz_onefile_encoder.py").write_text(ENCODER_FILE)
    monkeypatch.setattr(experiments, "__path__", [*experiments.__path__, str(extra)])
    entries = dict(ENCODERS._entries)
    try:
        assert "zz_onefile_mean_rgb" in ENCODERS  # no edit anywhere else: found by discovery
        enc = ENCODERS.build("zz_onefile_mean_rgb")
        out = enc.encode(np.full((2, 4, 4, 3), 6, dtype=np.uint8))["pooled"]
        assert out.shape == (2, 3) and np.all(out == 6)
    finally:
        sys.modules.pop("experiments.zz_onefile_encoder", None)
        ENCODERS._entries.clear()
        ENCODERS._entries.update(entries)
        ENCODERS._scanned.discard("experiments.zz_onefile_encoder")
