"""dhsa: Dynamic Hierarchical Sparse Attention on the CPU.

A C core (OpenBLAS, OpenMP, AVX2) behind a NumPy API::

    import dhsa
    out = dhsa.dense_attention(q, k, v)                  # exact, tiled
    out = dhsa.sparse_attention(q, k, v, dhsa.DHSAConfig(budget=2048))
    sel = dhsa.predict_selection(q, k, dhsa.DHSAConfig())  # the prediction alone

``dhsa.backend_features`` tells how the core was built (SIMD path, BLAS,
threads).
"""
from ._loader import _core
from .api import (AttentionInfo, Selection, build_info, dense_attention, force_scalar,
                  predict_selection, sparse_attention)
from .config import DHSAConfig

__version__ = "0.1.0"
backend_features = build_info()

__all__ = [
    "AttentionInfo",
    "DHSAConfig",
    "Selection",
    "backend_features",
    "build_info",
    "dense_attention",
    "force_scalar",
    "predict_selection",
    "sparse_attention",
    "__version__",
]
