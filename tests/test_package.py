"""The package's shape: ``import dhsa`` is NumPy-only, the model-facing parts
load on first use, ``backend_features`` is read live, and the library never
imports the executable specification (``dhsa.reference``) or the harness."""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import dhsa

PKG = pathlib.Path(dhsa.__file__).resolve().parent
HEAVY = ("torch", "transformers", "matplotlib")


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_dhsa_is_numpy_only():
    out = _python("import json, sys, dhsa\n"
                  "dhsa.DHSAConfig(); dhsa.backend_features\n"
                  f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert json.loads(out) == []


def test_models_after_a_plain_import():
    pytest.importorskip("transformers")
    out = _python("import sys, dhsa\n"
                  "m = dhsa.models\n"
                  "import dhsa.harness.models as h\n"
                  "assert m is h and sys.modules['dhsa.models'] is h\n"
                  "assert dhsa.models.load_smollm2 is h.load_smollm2 is dhsa.load_smollm2\n"
                  "print('torch' in sys.modules)")
    assert out.strip() == "False"  # loading the module is not loading the model stack


def test_import_dhsa_models_is_the_harness_module():
    out = _python("import dhsa.models, dhsa.harness.models as h, sys\n"
                  "from dhsa.models import smollm2_gguf_path\n"
                  "assert dhsa.models is h and smollm2_gguf_path is h.smollm2_gguf_path\n"
                  "print(dhsa.models.__name__)")
    assert out.strip() == "dhsa.harness.models"


def test_patch_names_are_lazy():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = _python("import sys, dhsa\n"
                  "before = 'dhsa.patching' in sys.modules\n"
                  "from dhsa.patching import patch, unpatch, get_handle, PatchHandle, CallRecord\n"
                  "assert (dhsa.patch, dhsa.unpatch, dhsa.get_handle) == (patch, unpatch, get_handle)\n"
                  "assert dhsa.PatchHandle is PatchHandle and dhsa.CallRecord is CallRecord\n"
                  "from transformers import AttentionInterface\n"
                  "print(before, 'dhsa' in AttentionInterface._global_mapping)")
    assert out.split() == ["False", "True"]


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        dhsa.nothing_here  # noqa: B018
    assert {"backend_features", "models", "patch", "load_smollm2"} <= set(dir(dhsa))
    from dhsa import backend_features
    assert backend_features == dhsa.build_info()


def test_backend_features_follow_force_scalar():
    fast = dhsa.backend_features
    assert fast == dhsa.build_info()
    dhsa.force_scalar(True)
    try:
        assert dhsa.backend_features["simd_path"] == "scalar"
    finally:
        dhsa.force_scalar(False)
    assert dhsa.backend_features["simd_path"] == fast["simd_path"]


def _imports(path: pathlib.Path):
    """Absolute names of the dhsa modules a source file imports."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod
            for a in node.names:
                yield f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name


LIBRARY = [p for p in PKG.rglob("*.py") if "harness" not in p.parts and p.name != "reference.py"]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_the_library_imports_neither_the_specification_nor_the_harness(path):
    names = set(_imports(path))
    assert "dhsa.reference" not in names, f"{path.name} imports the executable specification"
    assert not [n for n in names if n.startswith("dhsa.harness")], path.name


_ORDER = """
import sys
if sys.argv[1] == "torch":
    import torch, dhsa
else:
    import dhsa, torch
import numpy as np
r = np.random.default_rng(0)
q, k, v = (r.standard_normal((1, h, 1500, 64), dtype=np.float32) for h in (4, 2, 2))
cfg = dhsa.DHSAConfig(budget=512)
out = np.stack([dhsa.dense_attention(q, k, v, num_threads=2),
                dhsa.sparse_attention(q, k, v, cfg, num_threads=2),
                dhsa.sparse_attention(q, k, v, cfg, num_threads=1)])
maps = open("/proc/self/maps").read()
torch.set_num_threads(2)
sdpa = torch.nn.functional.scaled_dot_product_attention(
    torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), is_causal=True, enable_gqa=True)
np.save(sys.argv[2], out)
gomp = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
print(len(gomp), torch.get_num_threads(), float(np.abs(sdpa.numpy() - out[0]).max()) < 1e-4)
"""


def test_torch_may_be_imported_before_dhsa(tmp_path):
    """Both link libgomp.so.1; whichever is loaded first serves both (one
    OpenMP runtime), so the import order changes nothing: same outputs with 1
    and 2 threads, torch's threads intact."""
    pytest.importorskip("torch")
    import numpy as np
    runs = {}
    for first in ("torch", "dhsa"):
        r = subprocess.run([sys.executable, "-c", _ORDER, first, str(tmp_path / f"{first}.npy")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["1", "2", "True"], r.stdout  # one OpenMP runtime
        runs[first] = np.load(tmp_path / f"{first}.npy")
    assert (runs["torch"] == runs["dhsa"]).all()
    assert (runs["torch"][1] == runs["torch"][2]).all()  # thread count changes no bit
