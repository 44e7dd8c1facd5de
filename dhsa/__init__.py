"""dhsa: Dynamic Hierarchical Sparse Attention on the CPU.

A C core (OpenBLAS, OpenMP, AVX2) behind a NumPy API::

    import dhsa
    out = dhsa.dense_attention(q, k, v)                  # exact, tiled
    out = dhsa.sparse_attention(q, k, v, dhsa.DHSAConfig(budget=2048))
    sel = dhsa.predict_selection(q, k, dhsa.DHSAConfig())  # the prediction alone

``dhsa.backend_features`` tells how the core runs now (SIMD path, BLAS,
threads; read at each access, so it follows :func:`force_scalar`).

The library: :mod:`dhsa.api`, :mod:`dhsa.config`, :mod:`dhsa.rules`,
:mod:`dhsa.reference` (the executable specification), :mod:`dhsa.baselines`,
:mod:`dhsa.analysis` and :mod:`dhsa.patching` (transformers; loaded on first
use). The research harness lives in :mod:`dhsa.harness` (eval, demo,
models, viz, memory); ``dhsa.models`` is :mod:`dhsa.harness.models`.
``import dhsa`` needs NumPy only.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from ._loader import _core
from .api import (AttentionInfo, Selection, build_info, dense_attention, force_scalar,
                  predict_selection, sparse_attention)
from .calibration import Calibration, load_calibration
from .config import DHSAConfig
from .decode import DecodeInfo, KVCache, decode_attention

__version__ = "0.1.0"

# loaded on first use, so that `import dhsa` needs no torch: attribute -> module
_LAZY = {"patch": "dhsa.patching", "unpatch": "dhsa.patching", "get_handle": "dhsa.patching",
         "PatchHandle": "dhsa.patching", "CallRecord": "dhsa.patching",
         "load_smollm2": "dhsa.harness.models", "smollm2_gguf_path": "dhsa.harness.models",
         "load_gemma3": "dhsa.harness.models", "gemma3_gguf_path": "dhsa.harness.models"}
# submodules under a second name: alias -> module
_ALIASES = {"dhsa.models": "dhsa.harness.models"}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets ``import dhsa.models`` import :mod:`dhsa.harness.models` (the same module)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _ALIASES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # the import system returns what sys.modules holds under the alias
        sys.modules[module.__spec__.name] = importlib.import_module(_ALIASES[module.__spec__.name])


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())


def __getattr__(name):
    if name == "backend_features":
        return build_info()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if f"{__name__}.{name}" in _ALIASES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"backend_features", "models"})


__all__ = [
    "AttentionInfo",
    "Calibration",
    "DHSAConfig",
    "DecodeInfo",
    "KVCache",
    "Selection",
    "backend_features",
    "build_info",
    "decode_attention",
    "dense_attention",
    "force_scalar",
    "load_calibration",
    "get_handle",
    "load_gemma3",
    "load_smollm2",
    "patch",
    "unpatch",
    "predict_selection",
    "sparse_attention",
    "__version__",
]
