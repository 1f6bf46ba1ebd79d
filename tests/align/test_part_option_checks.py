"""KernelCCA and the resampler connectors check their own options: a bad value raises ValueError naming the
option, so ``alignfuse run --dry-run`` (experiments/part_options.py) reports it as a ConfigError naming the key,
before any data loads. Valid values still build and fit."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from align.connectors import build_connector
from align.kernel_cca import KernelCCA
from experiments.cli import main
from experiments.config import ConfigError
from experiments.part_options import check_aligner_options, check_connector_options


def _xy(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    return np.c_[z, rng.normal(size=(n, 3))], np.c_[z @ rng.normal(size=(2, 2)), rng.normal(size=(n, 2))]


@pytest.mark.parametrize("options, message", [
    ({"n_components": -1}, r"n_components must be a positive int, got -1"),
    ({"n_components": 0}, r"n_components must be a positive int, got 0"),
    ({"n_features": 0}, r"n_features must be a positive int, got 0"),
    ({"gamma": -0.5}, r"gamma must be 'scale' or a positive number, got -0\.5"),
    ({"gamma": "auto"}, r"gamma must be 'scale' or a positive number, got 'auto'"),
    ({"gamma_y": 0.0}, r"gamma_y must be None, 'scale' or a positive number, got 0\.0"),
    ({"reg": -1e-3}, r"reg must be a finite number >= 0, got -0\.001"),
    ({"reg_mode": "percent"}, r"reg_mode must be 'relative' or 'absolute', got 'percent'"),
    ({"solver": "qr"}, r"solver must be 'auto', 'covariance' or 'gram', got 'qr'"),
    ({"seed": -2}, r"seed must be a non-negative int, got -2"),
    ({"modalities": ["image", "image"]}, r"modalities must be two distinct names"),
])
def test_kernel_cca_rejects_bad_options_at_fit_and_at_validation(options, message):
    x, y = _xy()
    with pytest.raises(ValueError, match=message):
        KernelCCA(**options).fit(x, y)
    key = next(iter(options))  # a value of the wrong type is caught earlier, by the type check, naming the key
    with pytest.raises(ConfigError, match=rf"aligners\.kernel_cca(: {message}|\.{key}: Input should be)"):
        check_aligner_options("kernel_cca", options, "aligners.kernel_cca")


def test_kernel_cca_valid_options_still_fit():
    x, y = _xy()
    k = KernelCCA(2, n_features=64, gamma=0.5, gamma_y="scale", reg=1e-2, seed=3).fit(x, y)
    assert k.transform(x, y)[0].shape == (60, 2)
    assert np.all((k.correlations_ >= 0.0) & (k.correlations_ <= 1.0)) and k.correlations_.max() > 0.9
    check_aligner_options("kernel_cca", {"n_components": 2, "gamma": 0.5, "gamma_y": None}, "aligners.kernel_cca")


@pytest.mark.parametrize("name, options, message", [
    ("perceiver", {"depth": -1}, r"PerceiverResampler: depth must be a positive int, got -1"),
    ("perceiver", {"depth": 0}, r"PerceiverResampler: depth must be a positive int, got 0"),
    ("perceiver", {"num_latents": 0}, r"PerceiverResampler: num_latents must be a positive int, got 0"),
    ("perceiver", {"heads": 0}, r"PerceiverResampler: heads must be a positive int, got 0"),
    ("perceiver", {"ffn_mult": -2}, r"PerceiverResampler: ffn_mult must be a positive int, got -2"),
    ("perceiver", {"max_inputs": 0}, r"PerceiverResampler: max_inputs must be a positive int, got 0"),
    ("perceiver", {"dim": 0}, r"PerceiverResampler: dim must be a positive int, got 0"),
    ("qformer", {"depth": -1}, r"QFormer: depth must be a positive int, got -1"),
    ("qformer", {"num_queries": 0}, r"QFormer: num_queries must be a positive int, got 0"),
    ("gated_xattn", {"heads": 0}, r"GatedXAttnConnector: heads must be a positive int, got 0"),
    ("gated_xattn", {"ffn_mult": 0}, r"GatedXAttnConnector: ffn_mult must be a positive int, got 0"),
])
def test_connectors_reject_bad_sizes_naming_the_option(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_connector(name, 16, 32, num_lm_layers=4, **options)
    with pytest.raises(ConfigError, match=rf"connector_options\.{name}: " + message):
        check_connector_options(name, options, f"connector_options.{name}")


def test_valid_resampler_sizes_still_build():
    c = build_connector("perceiver", 16, 32, num_latents=3, dim=8, depth=1, heads=2, ffn_mult=1, max_inputs=5)
    assert len(c.layers) == 1 and c.num_tokens(5) == 3


@pytest.mark.parametrize("cfg, message", [
    ({"experiment": "align", "aligners": {"kernel_cca": {"n_components": -1}}},
     r"aligners\.kernel_cca: n_components must be a positive int, got -1"),
    ({"experiment": "bridge", "connectors": ["perceiver"], "connector_options": {"perceiver": {"depth": -1}}},
     r"connector_options\.perceiver: PerceiverResampler: depth must be a positive int, got -1"),
])
def test_dry_run_rejects_them(tmp_path, capsys, cfg, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**cfg, "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "out")}))
    assert main(["run", "--dry-run", str(path)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
