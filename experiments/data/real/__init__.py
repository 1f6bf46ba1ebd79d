"""Real data sets fetched from Debian / PyPI packages (see :mod:`experiments.data.fetch`): loaders and parsers."""
from experiments.data.real.basicmotions import load_basicmotions, read_ts
from experiments.data.real.fashion_mnist import FashionMNISTData, load_fashion_mnist, read_idx
from experiments.data.real.mfeat import load_mfeat
from experiments.data.real.nutrimouse import loo_score, load_nutrimouse, rcca_reference
from experiments.data.real.tuxpaint import TuxPaintData, load_tuxpaint

__all__ = ["FashionMNISTData", "TuxPaintData", "load_basicmotions", "load_fashion_mnist", "load_mfeat",
           "load_nutrimouse", "load_tuxpaint", "loo_score", "rcca_reference", "read_idx", "read_ts"]
