"""Load the C extension after its OpenBLAS, wherever pip put them."""
import ctypes
import os


def _preload_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError:  # pragma: no cover - a dependency, checked at install
        return
    lib = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()
from . import _core  # noqa: E402

__all__ = ["_core"]
