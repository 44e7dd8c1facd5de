"""dhsa.patching on tiny random transformers models (Llama, Qwen2, Mistral,
Gemma-2, Gemma-3): exactness with a full budget, sparsity with a small one,
padding, caches, bfloat16, unpatch, overrides and verification."""
from __future__ import annotations

import os
import inspect
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dhsa  # noqa: E402
from dhsa import patching, reference, rules  # noqa: E402

SMALL = dhsa.DHSAConfig(budget=128, block_size=16, sink=8, local=32, boundary_window=8,
                        nms_radius=8)
FULL = SMALL.replace(budget=4096)
ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gemma3"]
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              initializer_range=0.2, pad_token_id=0)


def build(arch: str, seed: int = 0):
    """A 2-layer random model (hidden 64, 4 heads / 2 KV heads) in its reference
    attention (eager for Gemma-2, whose softcap sdpa refuses; sdpa otherwise)."""
    T = transformers
    if arch == "llama":
        cfg, cls, ref = T.LlamaConfig(**COMMON), T.LlamaForCausalLM, "sdpa"
    elif arch == "qwen2":  # layer 0 full, layer 1 sliding window 64
        cfg = T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=64, max_window_layers=1)
        cls, ref = T.Qwen2ForCausalLM, "sdpa"
    elif arch == "mistral":  # every layer sliding, window wider than the budget
        cfg, cls, ref = T.MistralConfig(**COMMON, sliding_window=200), T.MistralForCausalLM, "sdpa"
    elif arch == "gemma2":  # softcap, alternating sliding window, query_pre_attn_scalar
        cfg = T.Gemma2Config(**COMMON, head_dim=16, sliding_window=64, query_pre_attn_scalar=24,
                             attn_logit_softcapping=5.0)
        cls, ref = T.Gemma2ForCausalLM, "eager"
    elif arch == "gemma3":
        if not hasattr(T, "Gemma3ForCausalLM"):
            pytest.skip("this transformers has no Gemma-3")
        cfg = T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=64, query_pre_attn_scalar=24,
                                 layer_types=["sliding_attention", "full_attention"])
        cls, ref = T.Gemma3ForCausalLM, "sdpa"
    else:  # pragma: no cover
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.set_attn_implementation(ref)
    return model


def tokens(B: int, L: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def assert_close(a, b, tol=2e-5):
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


def configs_of(model):
    return patching.registry._all_configs(model)


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    # no binding may leak from one test into the next through the default handle
    patching.default_handle().reset()


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dense_when_fits", [True, False], ids=["dense-fits", "sparse-kernel"])
def test_full_budget_matches_reference(arch, dense_when_fits):
    model = build(arch)
    ids = tokens(1, 300)
    ref = logits(model, ids)
    gen_ref = model.generate(ids[:, :40], max_new_tokens=12, do_sample=False)
    # sparse-kernel: every layer through the sparse kernel, the sliding ones too
    handle = dhsa.patching.patch(model, FULL, dense_when_fits=dense_when_fits,
                                 sparse_sliding=not dense_when_fits)
    assert model.config._attn_implementation == "dhsa"
    out = logits(model, ids)
    assert_close(out, ref)
    paths = {r.path for r in handle.stats}
    assert paths == ({"dense"} if dense_when_fits else {"sparse"})
    assert all(r.density == 1.0 for r in handle.stats)
    gen = model.generate(ids[:, :40], max_new_tokens=12, do_sample=False)
    assert torch.equal(gen, gen_ref)
    assert any(r.path == "decode" for r in handle.stats)
    handle.verify()


def test_kwargs_reach_the_core():
    """Gemma-2: softcap on every layer, the window on the sliding ones only,
    scaling = query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5)."""
    model = build("gemma2")
    seen = []
    real = patching.forward.dense_attention

    def spy(q, k, v, **kw):
        seen.append(kw)
        return real(q, k, v, **kw)

    handle = patching.patch(model, FULL)
    patching.forward.dense_attention = spy
    try:
        logits(model, tokens(1, 100))
    finally:
        patching.forward.dense_attention = real
    assert len(seen) == 2
    assert [kw["window"] for kw in seen] == [64, None]
    assert all(kw["softcap"] == 5.0 for kw in seen)
    assert all(kw["scale"] == pytest.approx(24 ** -0.5) for kw in seen)
    assert [r.window for r in handle.stats] == [64, None]


# ------------------------------------------------------------------ sparsity

@pytest.mark.parametrize("arch", ARCHS)
def test_small_budget_is_sparse(arch):
    model = build(arch)
    # Mistral slides on every layer: only sparse_sliding lets it use the prediction
    slide = arch == "mistral"
    handle = patching.patch(model, SMALL, sparse_sliding=slide)
    out = logits(model, tokens(1, 300))
    assert torch.isfinite(out).all()
    calls = handle.verify()
    assert sorted(calls) == [0, 1] and all(n == 1 for n in calls.values())
    summ = handle.summary()
    assert set(summ) == {0, 1}
    sparse = [r for r in handle.stats if r.path == "sparse"]
    assert sparse, [(r.layer, r.path, r.reason) for r in handle.stats]
    assert all(0.0 < r.density < 1.0 for r in sparse)
    assert all(r.predict_seconds > 0 and r.attention_seconds > 0 for r in sparse)
    for r in handle.stats:
        if r.window is not None and not slide:  # sliding layers run the exact windowed kernel
            assert r.path == "dense" and r.reason == "sliding window"
    assert "density" in handle.format_summary()
    assert handle.format_summary().splitlines()[-1].startswith(
        f"sparse path in {len({r.layer for r in sparse})} of 2 layers")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_sliding_layers_run_exact_unless_asked(arch):
    """In density mode a sliding layer never "fits", yet its queries see at most
    `window` keys: it runs the exact windowed kernel, and the summary says which
    layers ran sparse; sparse_sliding=True sends it through the prediction."""
    model = build(arch)
    dens = SMALL.replace(budget_mode="density", density=0.25)
    ids = tokens(1, 300)
    handle = patching.patch(model, dens)
    logits(model, ids)
    by_layer = {r.layer: r for r in handle.stats}
    sliding = [l for l, r in by_layer.items() if r.window is not None]
    full = [l for l, r in by_layer.items() if r.window is None]
    assert sliding and full
    assert all(by_layer[l].path == "dense" and by_layer[l].reason == "sliding window"
               for l in sliding)
    assert all(by_layer[l].path == "sparse" for l in full)
    last = handle.format_summary().splitlines()[-1]
    assert last.startswith(f"sparse path in {len(full)} of 2 layers ({', '.join(map(str, full))})")
    assert f"{by_layer[full[0]].density:.3f}" in last
    handle = patching.patch(model, dens, sparse_sliding=True)
    handle.reset()
    logits(model, ids)
    assert all(r.path == "sparse" for r in handle.stats)
    patching.unpatch(model)


# ------------------------------------------------------------------ patch / unpatch

def test_unpatch_restores_exactly():
    model = build("gemma2")
    ids = tokens(1, 200)
    before = logits(model, ids)
    impls = [c._attn_implementation_internal for c in configs_of(model)]
    handle = patching.patch(model, SMALL)
    assert not torch.equal(logits(model, ids), before)  # sparse changes the result
    assert patching.unpatch(model) is True
    assert [c._attn_implementation_internal for c in configs_of(model)] == impls
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model, ids), before)
    assert patching.get_handle(model) is None and not handle.active
    assert patching.unpatch(model) is False  # harmless
    n = sum(handle.calls.values())
    logits(model, ids)
    assert sum(handle.calls.values()) == n  # nothing reaches the old handle


def test_patch_twice_is_harmless():
    model = build("llama")
    ids = tokens(1, 200)
    ref = logits(model, ids)
    h1 = patching.patch(model, SMALL)
    h2 = patching.patch(model, FULL)
    assert h1 is h2 and h2.config == FULL
    assert_close(logits(model, ids), ref)
    assert len(h2.stats) == 2
    patching.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), ref)


def test_set_attn_implementation_and_from_pretrained(tmp_path):
    model = build("llama")
    ids = tokens(1, 64)
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="dhsa")
    loaded.eval()
    assert loaded.config._attn_implementation == "dhsa"
    default = patching.default_handle()
    default.reset()
    assert_close(logits(loaded, ids), ref)
    assert sum(default.calls.values()) == 2  # unpatched modules report to the default handle
    model.set_attn_implementation("dhsa")
    assert_close(logits(model, ids), ref)
    model.set_attn_implementation("sdpa")
    assert torch.equal(logits(model, ids), ref)


def test_dense_layers_and_layer_configs():
    model = build("llama")
    handle = patching.patch(model, SMALL, dense_layers=[0])
    logits(model, tokens(1, 300))
    by_layer = {r.layer: r for r in handle.stats}
    assert by_layer[0].path == "dense" and by_layer[0].reason == "dense layer"
    assert by_layer[0].density == 1.0
    assert by_layer[1].path == "sparse" and by_layer[1].density < 1.0

    handle = patching.patch(model, SMALL, dense_layers=range(2))
    logits(model, tokens(1, 300))
    assert {r.path for r in handle.stats} == {"dense"}

    wide = SMALL.replace(budget=4096)
    handle = patching.patch(model, SMALL, layer_configs={1: wide})
    logits(model, tokens(1, 300))
    by_layer = {r.layer: r for r in handle.stats}
    assert by_layer[0].path == "sparse" and by_layer[1].path == "dense"
    assert handle.config_for(1, "model.layers.1.self_attn") == (wide, False)


def test_errors_name_what_is_missing():
    with pytest.raises(TypeError, match="config"):
        patching.patch(torch.nn.Linear(2, 2))

    class JustMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(**COMMON)
            self.body = torch.nn.Linear(4, 4)

        def set_attn_implementation(self, impl):  # pragma: no cover - never reached
            pass

    with pytest.raises(ValueError, match="no attention modules"):
        patching.patch(JustMLP())
    with pytest.raises(TypeError, match="DHSAConfig"):
        patching.patch(build("llama"), {"budget": 128})


def test_verify_catches_bypassing_modules():
    model = build("llama")
    handle = patching.patch(model, SMALL, verify=True)  # the probe passes and is forgotten
    assert handle.stats == [] and not handle.calls
    with pytest.raises(RuntimeError, match="forward pass first"):
        handle.verify()
    # the implementation switched away behind the patch's back: nothing reaches DHSA
    model.config._attn_implementation_internal = "sdpa"
    logits(model, tokens(1, 50))
    with pytest.raises(RuntimeError, match="never called"):
        handle.verify()
    patching.unpatch(model)

    # attention modules that compute attention themselves
    model = build("llama")
    for mod in patching.registry._attention_modules(model).values():
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kw):
            return torch.zeros_like(hidden_states), None
        mod.forward = types.MethodType(forward, mod)
    with pytest.raises(RuntimeError, match="never called"):
        patching.patch(model, SMALL, verify=True)
    assert model.config._attn_implementation == "sdpa"  # a failed verify undoes the patch
    assert patching.get_handle(model) is None


# ------------------------------------------------------------------ padding, caches, dtypes

@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded_runs(arch, side):
    model = build(arch)
    patching.patch(model, SMALL)
    ids = tokens(2, 300)
    a = logits(model, ids[:1])
    b = logits(model, ids[1:, :200])
    x = torch.zeros_like(ids)
    x[0] = ids[0]
    mask = torch.ones_like(ids)
    if side == "left":
        x[1, 100:] = ids[1, :200]
        mask[1, :100] = 0
        real = slice(100, 300)
    else:
        x[1, :200] = ids[1, :200]
        mask[1, 200:] = 0
        real = slice(0, 200)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    handle = patching.get_handle(model)
    handle.reset()
    out = logits(model, x, attention_mask=mask, position_ids=pos)
    assert_close(out[0], a[0], 1e-6)
    assert_close(out[1, real], b[0], 1e-6)
    assert all(r.padded for r in handle.stats) and len(handle.stats) == 2
    assert any(r.path == "sparse" for r in handle.stats)


def test_padded_generate_matches_single_runs():
    model = build("llama")
    patching.patch(model, SMALL)
    ids = tokens(2, 160)
    x = ids.clone()
    x[1, :40] = 0
    x[1, 40:] = ids[1, :120]
    mask = torch.ones_like(x)
    mask[1, :40] = 0
    g = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False,
                       pad_token_id=0)
    g0 = model.generate(input_ids=ids[:1], max_new_tokens=8, do_sample=False)
    g1 = model.generate(input_ids=ids[1:, :120], max_new_tokens=8, do_sample=False)
    assert torch.equal(g[0, 160:], g0[0, 160:])
    assert torch.equal(g[1, 160:], g1[0, 120:])


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_continued_prefill_with_cache(arch):
    """Lq < Lk: a second prefill chunk attends to the cached keys as well."""
    model = build(arch)
    ids = tokens(1, 300)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def two_step():
        with torch.no_grad():
            first = model(input_ids=ids[:, :200], use_cache=True)
            cache = getattr(first, "cache", None) or first.past_key_values
            return model(input_ids=ids[:, 200:], **{cache_arg: cache}).logits

    ref = two_step()
    handle = patching.patch(model, FULL)
    assert_close(two_step(), ref)
    second = handle.stats[2:]
    assert [r.q_len for r in second] == [100, 100]
    assert all(r.k_len > r.q_len for r in second)

    patching.patch(model, SMALL)
    handle.reset()
    two_step()
    assert any(r.path == "sparse" and r.q_len == 100 and r.k_len == 300 for r in handle.stats)


def test_bfloat16_model():
    model = build("llama")
    ids = tokens(1, 300)
    ref32 = logits(model, ids)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        ref16 = model(input_ids=ids).logits.float()  # sdpa in bfloat16
    handle = patching.patch(model, FULL)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    # DHSA computes in float32 inside: no further from float32 than sdpa's own bfloat16
    err = float((out.float() - ref32).abs().max())
    err_sdpa = float((ref16 - ref32).abs().max())
    assert err <= 1.5 * err_sdpa + 1e-3, (err, err_sdpa)
    patching.patch(model, SMALL)
    handle.reset()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.isfinite(out.float()).all()
    assert any(r.path == "sparse" for r in handle.stats)
    gen = model.generate(ids[:, :30], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 35)


def test_unusual_masks_fall_back_exactly():
    """Packed sequences (block-diagonal mask) are not a padding pattern: exact fallback."""
    model = build("llama")
    ids = tokens(1, 300)
    pos = torch.cat([torch.arange(150), torch.arange(150)])[None]
    ref = logits(model, ids, position_ids=pos, use_cache=False)
    handle = patching.patch(model, SMALL)
    out = logits(model, ids, position_ids=pos, use_cache=False)
    assert_close(out, ref)
    assert {r.path for r in handle.stats} == {"fallback"}


def test_static_cache_generate():
    model = build("llama")
    ids = tokens(1, 40)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    handle = patching.patch(model, FULL)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    handle.verify()
    prefill = [r for r in handle.stats if r.q_len == 40]
    assert len(prefill) == 2 and all(r.k_len > 40 for r in prefill)
    assert all("empty static cache slots" in r.reason.split(",") for r in prefill)


def test_training_mode_dropout_raises():
    model = build("llama")
    model.config.attention_dropout = 0.1
    for mod in patching.registry._attention_modules(model).values():
        mod.attention_dropout = 0.1
    patching.patch(model, SMALL)
    model.train()
    with pytest.raises(NotImplementedError, match="inference-only"):
        model(input_ids=tokens(1, 20))


def test_mask_analysis_spans():
    """The padding analysis on hand-made masks."""
    L = 6
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    left = causal.clone()
    left[:, :2] = False  # two padding keys on the left
    spans = patching.masks._spans_of(torch.stack([causal, left]), None)
    assert spans == [(0, 6, 0, 6), (2, 6, 2, 6)]
    right = causal.clone()
    right[:, 4:] = False
    assert patching.masks._spans_of(right[None], None) == [(0, 4, 0, 4)]
    hole = causal.clone()
    hole[:, 2] = False  # a padding key in the middle: not a span
    assert patching.masks._spans_of(hole[None], None) is None
    window = causal & ~torch.tril(torch.ones(L, L, dtype=torch.bool), diagonal=-3)
    assert patching.masks._spans_of(window[None], 3) == [(0, 6, 0, 6)]
    assert patching.masks._spans_of(window[None], None) is None
    decode = torch.ones(1, 1, 8, dtype=torch.bool)
    decode[..., :3] = False
    assert patching.masks._spans_of(decode, None) == [(3, 8, 0, 1)]


def _qkv(Lq: int, Lk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, Lq, 16, generator=g), torch.randn(1, 2, Lk, 16, generator=g),
            torch.randn(1, 2, Lk, 16, generator=g))


def test_no_mask_with_more_keys_is_never_silent():
    """No mask, Lk > Lq (causal, Lq > 1): transformers' prefill into an empty
    StaticCache (queries at 0..Lq-1) only when the slots past Lq are all zero,
    and the record says so; keys past Lq that hold anything raise."""
    model = build("llama")
    handle = patching.patch(model, FULL)
    mod = patching.registry._attention_modules(model)["model.layers.0.self_attn"]
    q, k, v = _qkv(20, 32)
    k[:, :, 20:] = 0.0  # the unwritten slots of a fresh StaticCache
    v[:, :, 20:] = 0.0
    out, _ = patching.dhsa_attention_forward(mod, q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :20], v[:, :, :20],
                                                           is_causal=True, enable_gqa=True)
    assert_close(out.transpose(1, 2), ref, 1e-6)
    (rec,) = handle.stats
    assert rec.k_len == 32 and "empty static cache slots" in rec.reason.split(",")

    k[:, :, 25, 3] = 1.0  # one key past Lq is not empty: no silent reading
    with pytest.raises(ValueError, match="no attention mask and 32 keys for 20 queries"):
        patching.dhsa_attention_forward(mod, q, k, v, None)
    v[:, :, 25, 3] = 0.0
    k[:, :, 25, 3] = 0.0
    v[:, :, 31, 0] = 2.0  # a value alone is enough
    with pytest.raises(ValueError, match="not empty"):
        patching.dhsa_attention_forward(mod, q, k, v, None)

    # with a mask the queries are the last Lq positions and every key counts
    q, k, v = _qkv(20, 32, seed=1)
    mask = torch.from_numpy(rules.visible_mask(20, 32))[None, None]
    out, _ = patching.dhsa_attention_forward(mod, q, k, v, mask)
    want = reference.dense_attention(q.numpy(), k.numpy(), v.numpy())
    assert_close(out.transpose(1, 2), torch.from_numpy(want).float(), 1e-5)
    assert handle.stats[-1].reason == "fits budget"
