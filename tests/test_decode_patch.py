"""Sparse decode in a patched model (DHSAConfig.decode_budget): exact at a
full budget, sparse at a small one, and in step with transformers' cache
through new sequences, crops, beam search and static caches."""
from __future__ import annotations

import inspect
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dhsa  # noqa: E402
from dhsa import patching  # noqa: E402
from test_patching import FULL, SMALL, build, tokens  # noqa: E402

FULL_DECODE = FULL.replace(decode_budget=4096)
SMALL_DECODE = SMALL.replace(decode_budget=64)


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    patching.default_handle().reset()


def generate(model, ids, n=12, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def step(model, ids, cache=None):
    """One forward with a cache (the argument's name differs across transformers)."""
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kw = {arg: cache} if cache is not None else {"use_cache": True}
    with torch.no_grad():
        out = model(input_ids=ids, **kw)
    return out.logits, getattr(out, "cache", None) or out.past_key_values


def crop(cache, length: int) -> None:
    """Crop a DynamicCache to ``length`` tokens (newer transformers take the
    count to remove, as a negative number)."""
    try:
        cache.crop(length - cache.get_seq_length())
    except ValueError:
        cache.crop(length)


def decode_records(handle):
    return [r for r in handle.stats if r.q_len == 1]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_full_decode_budget_generates_what_exact_decode_does(arch):
    model = build(arch)
    ids = tokens(1, 300)
    handle = patching.patch(model, FULL)
    exact = generate(model, ids)
    with torch.no_grad():
        exact_logits = model(input_ids=exact[:, :-1]).logits[:, -1]
    patching.patch(model, FULL_DECODE)
    handle.reset()
    out = generate(model, ids)
    assert torch.equal(out, exact)
    recs = decode_records(handle)
    sparse = [r for r in recs if r.reason == "sparse decode"]
    assert sparse and all(r.path == "decode" and r.density == 1.0 for r in sparse)
    if arch == "gemma3":  # the sliding layer decodes exactly, the full one from its cache
        assert {r.layer for r in sparse} == {1}
    # one more step through the decode path, compared as logits
    handle.decode_states.clear()
    _, cache = step(model, exact[:, :-2])
    last = step(model, exact[:, -2:-1], cache)[0][:, -1]
    err = float((last - exact_logits).abs().max())
    assert err <= 1e-5 * max(1.0, float(exact_logits.abs().max())), err


def test_a_small_decode_budget_reads_fewer_keys():
    model = build("llama")
    ids = tokens(1, 400)
    handle = patching.patch(model, SMALL_DECODE)
    out = generate(model, ids, n=8)
    assert out.shape == (1, 408)
    sparse = [r for r in decode_records(handle) if r.reason == "sparse decode"]
    assert len(sparse) == 2 * 7  # both layers, every step after the prefill
    assert all(r.density < 64 / 400 + 1e-9 for r in sparse)
    # each layer's state holds every key it saw
    assert len(handle.decode_states.cache(0)) == 407
    assert handle.decode_states.rebuilds == 0


def test_a_new_sequence_starts_a_new_state():
    model = build("llama")
    a, b = tokens(1, 200, seed=3), tokens(1, 250, seed=4)
    patching.patch(model, FULL)
    want_a, want_b = generate(model, a), generate(model, b)
    handle = patching.patch(model, FULL_DECODE)
    assert torch.equal(generate(model, a), want_a)
    assert torch.equal(generate(model, b), want_b)
    assert handle.decode_states.rebuilds == 0


def test_a_cropped_cache_crops_the_state():
    model = build("llama")
    ids = tokens(1, 260)
    handle = patching.patch(model, FULL_DECODE)
    _, cache = step(model, ids[:, :250])
    for t in range(250, 255):
        _, cache = step(model, ids[:, t:t + 1], cache)
    crop(cache, 252)
    got = step(model, ids[:, 252:253], cache)[0][:, -1]
    with torch.no_grad():
        want = model(input_ids=ids[:, :253]).logits[:, -1]
    assert handle.decode_states.crops == 2  # once per layer
    assert handle.decode_states.rebuilds == 0
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def test_beam_search_reorders_the_state():
    model = build("llama")
    ids = tokens(1, 200)
    patching.patch(model, FULL)
    want = generate(model, ids, n=6, num_beams=3)
    handle = patching.patch(model, FULL_DECODE)
    handle.decode_states.clear()
    got = generate(model, ids, n=6, num_beams=3)
    assert torch.equal(got, want)
    states = handle.decode_states
    assert states.reorders + states.rebuilds > 0  # the beams were followed, never used stale


def test_static_cache_decode():
    model = build("llama")
    ids = tokens(1, 60)
    patching.patch(model, FULL)
    want = generate(model, ids, n=6, cache_implementation="static")
    handle = patching.patch(model, FULL_DECODE)
    got = generate(model, ids, n=6, cache_implementation="static")
    assert torch.equal(got, want)
    # every step read the layer's cache (the static cache's empty slots left out)
    steps = decode_records(handle)
    assert len(steps) == 2 * 5 and all(r.reason == "sparse decode" for r in steps)
    assert handle.decode_states.rebuilds == 0
    # exact decode from a static cache reads the filled slots in place, head by head
    patching.patch(model, FULL)
    handle.reset()
    assert torch.equal(generate(model, ids, n=6, cache_implementation="static"), want)
    assert all(r.path == "decode" for r in decode_records(handle))


def test_unpatch_drops_the_states():
    model = build("llama")
    handle = patching.patch(model, FULL_DECODE)
    generate(model, tokens(1, 100), n=3)
    assert len(handle.decode_states) == 2
    dhsa.unpatch(model)
    assert len(handle.decode_states) == 0


def test_decode_threads_are_validated_and_used():
    model = build("llama")
    with pytest.raises(ValueError, match="decode_threads"):
        patching.patch(model, FULL_DECODE, decode_threads=0)
    handle = patching.patch(model, FULL_DECODE, decode_threads=None, num_threads=2)
    assert handle.decode_threads is None  # the one-query calls take num_threads
    patching.patch(model, FULL_DECODE)
    assert handle.decode_threads == 1
