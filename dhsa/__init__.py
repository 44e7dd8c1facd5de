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

# Hugging Face integration, loaded on first use so that `import dhsa` needs no torch
_LAZY = {"patch": "patching", "unpatch": "patching", "get_handle": "patching",
         "PatchHandle": "patching", "CallRecord": "patching",
         "load_smollm2": "models", "smollm2_gguf_path": "models"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

backend_features = build_info()

__all__ = [
    "AttentionInfo",
    "DHSAConfig",
    "Selection",
    "backend_features",
    "build_info",
    "dense_attention",
    "force_scalar",
    "get_handle",
    "load_smollm2",
    "patch",
    "unpatch",
    "predict_selection",
    "sparse_attention",
    "__version__",
]
