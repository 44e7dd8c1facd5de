"""The benchmark scripts' own logic: the FlexAttention block mask built from
a DHSA selection must describe exactly that selection (else the comparison
would not be the same work), and the scripts run end to end on tiny sizes
and write their results."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import dhsa
from dhsa import reference
from conftest import make_qkv, rel_err

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

SANITIZER = os.environ.get("DHSA_UNDER_SANITIZER") == "1"
CFG = dhsa.DHSAConfig(budget=256, block_size=64, sink=16, local=96, boundary_window=8,
                      nms_radius=4, min_chunk=4, max_chunk=16)


def test_keep_table_is_the_selection_mask(rng):
    import bench_flex
    q, k, _ = make_qkv(rng, 2, 6, 3, 640, 640, 32)
    sel = dhsa.predict_selection(q, k, CFG)
    keep = bench_flex.selection_keep_table(sel, 640)
    want = reference.selection_mask(sel.offsets, sel.starts, sel.ends, sel.batch, sel.groups,
                                    640, 640, sel.block_size)
    # keep is per query block; the reference per query row
    np.testing.assert_array_equal(np.repeat(keep.astype(bool), 64, axis=2), want)


@pytest.mark.skipif(SANITIZER, reason="torch under ASan is slow and not our code")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_reproduces_the_sparse_output(rng):
    torch = pytest.importorskip("torch")
    import bench_flex
    from torch.nn.attention.flex_attention import flex_attention

    L, H, D = 512, 6, 32
    q, k, v = make_qkv(rng, 1, H, 2, L, L, D)
    sel = dhsa.predict_selection(q, k, CFG)
    keep = bench_flex.selection_keep_table(sel, L)
    mask, nfull, npartial = bench_flex.flex_block_mask(torch, keep, H, L, 64)
    assert nfull + npartial > 0
    # every block FlexAttention visits holds a selected, causally visible key
    assert (nfull + npartial) * 64 * 64 >= int(sel.pairs_selected.sum()) * (H // sel.groups)
    with torch.no_grad():  # eager flex (no compile): slow but exact
        out = flex_attention(*(torch.from_numpy(x) for x in (q, k, v)), block_mask=mask,
                             enable_gqa=True, scale=float(1 / np.sqrt(D))).numpy()
    ours = dhsa.sparse_attention(q, k, v, CFG, selection=sel)
    assert rel_err(out, ours) <= 1e-5


@pytest.mark.skipif(SANITIZER, reason="torch under ASan is slow and not our code")
def test_bench_threads_runs_and_writes_results(tmp_path):
    pytest.importorskip("torch")
    import bench_threads
    out = tmp_path / "threads"
    rc = bench_threads.main(["--threads", "1,2", "--lengths", "1K", "--budget", "512",
                             "--repeats", "1", "--warmup", "0", "--quiet-wait", "0",
                             "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    methods = {(r["threads"], r["method"]) for r in doc["rows"]}
    assert methods == {(t, m) for t in (1, 2)
                       for m in ("dense", "dhsa_total", "dhsa_predict", "torch_sdpa")}
    assert all(r["seconds"] > 0 for r in doc["rows"])
    assert "| 1024 |" in out.with_suffix(".md").read_text()


def test_benchmarks_import_dhsa_like_any_user():
    """No sys.path edits and no import-order rule in the benchmark scripts."""
    for path in sorted(BENCH.glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        assert "PYTHONPATH=." not in text and 'env["PYTHONPATH"]' not in text, path.name
