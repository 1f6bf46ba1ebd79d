"""Import layout: modules split for size keep their old import paths, parts register through discovery alone
(no trailing imports), and modules import on their own in a fresh interpreter (no import cycles)."""
from __future__ import annotations

import subprocess
import sys

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
