"""Load the C extension after its OpenBLAS, wherever pip put them."""
import ctypes
import importlib.util
import os


def _openblas_path():
    # found without importing scipy_openblas32: its __init__ loads the
    # library, and the thread count below must be set before that happens
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "lib", "libscipy_openblas.so")


def _preload_openblas() -> None:
    lib = _openblas_path()
    if lib is None:  # pragma: no cover - a dependency, checked at install
        return
    if not os.path.exists(lib):  # pragma: no cover
        return
    # The core runs its own OpenMP threads and calls BLAS inside them, so this
    # OpenBLAS never needs a thread pool of its own: ask for one thread while
    # it initialises (it reads the variable once), then restore the variable.
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved


def _import_core():
    try:
        from . import _core
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        if importlib.util.find_spec("dhsa._core") is None:
            # the usual cause: a source checkout's dhsa/ (no compiled extension) found
            # before the installed package, as `python -m dhsa` run from the clone's root does
            raise ImportError(
                f"dhsa is imported from {here}, which holds no compiled extension "
                "(dhsa/_core*.so). If that is a source checkout, install it in editable "
                "mode (pip install -e .) so the extension is built there, or run Python "
                "from outside the checkout to use the installed package.") from exc
        raise
    return _core


_preload_openblas()
_core = _import_core()

__all__ = ["_core"]
