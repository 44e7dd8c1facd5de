"""dhsa.harness.protocol: equal density, the dense tail, and losses that never see the future."""
from __future__ import annotations

import numpy as np
import pytest

import dhsa
from dhsa.harness.intervals import (bootstrap_mean, mcnemar_exact_p, mean_ci, paired_binary_ci,
                                    paired_ci, wilson)
from dhsa.harness.protocol import (PER_QUERY_CAUSAL, achieved_density, forced_keys,
                                   matched_config, per_query_config)

METHODS = ("dhsa", "block_topk", "streaming", "vertical_slash")


# ---- equal density ---------------------------------------------------------------

@pytest.mark.parametrize("L", [2048, 3000, 4096, 8192])
@pytest.mark.parametrize("target", [0.125, 0.25])
def test_matched_config_reaches_the_target_for_every_method(L, target):
    rng = np.random.default_rng(L)
    q = rng.standard_normal((1, 2, L, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, L, 16)).astype(np.float32)
    for m in METHODS:
        cfg = matched_config(m, target, L)
        assert cfg.method == m and cfg.budget_mode == "density"
        sel = dhsa.predict_selection(q, k, cfg)
        # the closed form equals what the selection really keeps, for every method
        assert sel.density == pytest.approx(achieved_density(cfg, L), abs=1e-9)
        assert sel.density == pytest.approx(target, abs=0.003)


@pytest.mark.parametrize("tail", [1, 64, 100])
def test_achieved_density_counts_the_dense_tail(tail):
    L = 2048
    rng = np.random.default_rng(tail)
    q = rng.standard_normal((1, 2, L, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, L, 16)).astype(np.float32)
    for m in METHODS:
        cfg = matched_config(m, 0.125, L).replace(dense_tail=tail)
        got = dhsa.predict_selection(q, k, cfg).density
        assert got == pytest.approx(achieved_density(cfg, L), abs=1e-9)
        assert got > achieved_density(cfg.replace(dense_tail=0), L)


def test_forced_keys_scale_down_at_short_lengths_and_keep_the_defaults_at_long():
    assert forced_keys(0.125, 32768) == (64, 256)
    s, l = forced_keys(0.125, 4096)
    assert s < 64 and l < 256
    assert s + l + 64 <= 0.125 * 4096 / 2


def test_matched_config_refuses_unreachable_targets_and_is_none_for_dense():
    assert matched_config("dense", 0.125, 4096) is None
    with pytest.raises(ValueError, match="cannot be reached"):
        matched_config("dhsa", 0.02, 512)
    with pytest.raises(ValueError, match="target density"):
        matched_config("dhsa", 0.0, 4096)


def test_per_query_config_refuses_vertical_slash():
    cfg = matched_config("dhsa", 0.25, 4096)
    assert per_query_config(cfg).block_size == 1
    assert "vertical_slash" not in PER_QUERY_CAUSAL
    with pytest.raises(ValueError, match="not causal"):
        per_query_config(cfg.replace(method="vertical_slash"))


# ---- intervals -----------------------------------------------------------------

def test_wilson_interval():
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.75  # 10/10 is not certainty
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and hi - lo > 0.5
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 10)
    big = rng.normal(1.0, 1.0, 1000)
    lo_s, hi_s = bootstrap_mean(small)
    lo_b, hi_b = bootstrap_mean(big)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 3
    assert bootstrap_mean([0.5, 0.5]) == (0.5, 0.5)
    m, lo, hi = mean_ci([1, 1, 0, 1], "all")
    assert m == 0.75 and lo < 0.75 < hi


def test_paired_intervals_and_the_exact_test():
    same = [1] * 10
    lo, hi = paired_binary_ci(same, same)
    assert lo < 0 < hi  # ten ties are not certainty of no difference
    lo, hi = paired_binary_ci([0] * 10, same)
    assert hi < -0.5 and lo == -1.0
    # three disagreements of ten, all one way: an interval, but no difference proven
    three = [0, 0, 0] + [1] * 7
    assert mcnemar_exact_p(three, same) == pytest.approx(0.25)
    assert mcnemar_exact_p([0] * 6 + [1] * 4, same) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(same, same) == 1.0
    d, lo, hi = paired_ci(three, same, "all")
    assert d == pytest.approx(-0.3) and lo < d < hi
    d, lo, hi = paired_ci([0.5, 0.7, 0.9], [0.4, 0.4, 0.4], "share")
    assert d == pytest.approx(0.3) and lo <= d <= hi
    with pytest.raises(ValueError):
        paired_binary_ci([0.5], [1])
    # shares all alike: bounded as n proportions, not a zero-width interval
    m, lo, hi = mean_ci([0.25] * 10, "share")
    assert m == 0.25 and lo < 0.25 < hi


# ---- the runner on a small random model ----------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dhsa.harness.protocol import Runner  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              initializer_range=0.2, pad_token_id=0)


def _model(arch: str):
    torch.manual_seed(0)
    T = transformers
    if arch == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**COMMON))
    else:
        cfg = T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=64,
                                 query_pre_attn_scalar=24,
                                 layer_types=["sliding_attention", "full_attention"])
        m = T.Gemma3ForCausalLM(cfg)
    return m.eval()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def runner(request):
    r = Runner(_model(request.param), num_threads=2)
    yield r
    r.close()


L_TEST = 1536
SCORED = 128


def _ids(seed: int):
    return np.random.default_rng(seed).integers(1, 256, L_TEST).tolist()


@pytest.mark.parametrize("method,continuation", [("dhsa", "exact"), ("dhsa", "sparse"),
                                                 ("block_topk", "sparse"),
                                                 ("streaming", "sparse"),
                                                 ("vertical_slash", "exact")])
def test_no_loss_depends_on_a_later_token(runner, method, continuation):
    cfg = matched_config(method, 0.25, L_TEST)
    ids = _ids(1)
    prefix, cont = ids[:-SCORED], ids[-SCORED:]
    r0 = runner.causal_nll(prefix, cont, cfg, continuation=continuation)
    base = r0["nll"]
    assert base.shape == (SCORED,) and np.all(np.isfinite(base))
    if continuation == "sparse":  # the scored tokens really went through the method
        assert r0["continuation_density"] < 0.5
    for j in (5, 64, 100, SCORED - 1):
        changed = list(cont)
        changed[j] = (changed[j] % 255) + 1
        nll = runner.causal_nll(prefix, changed, cfg, continuation=continuation)["nll"]
        # losses of the targets before position j are those of the unchanged input
        np.testing.assert_allclose(nll[:j], base[:j], rtol=1e-6, atol=1e-7)
        assert nll[j] != base[j]  # its own target changed: the loss must see that


def test_the_one_forward_loss_does_depend_on_later_tokens(runner):
    """The negative control: the leaky protocol fails the same test."""
    cfg = matched_config("vertical_slash", 0.25, L_TEST)
    ids = _ids(2)
    base = runner.leaky_nll(ids, cfg)["nll"]
    changed = list(ids)
    for j in range(L_TEST - 32, L_TEST):  # the last queries pick every block's keys
        changed[j] = (changed[j] % 255) + 1
    nll = runner.leaky_nll(changed, cfg)["nll"]
    first = L_TEST - 32 - 1  # targets before the first changed token
    assert np.max(np.abs(nll[:first] - base[:first])) > 1e-4


def test_one_forward_block_selection_lets_one_later_token_move_earlier_losses(runner):
    """The leak the causal protocols close: with one forward and 64-query
    blocks, changing a single token moves the loss of an earlier position in
    its block for some position of the text."""
    cfg = matched_config("dhsa", 0.25, L_TEST)
    ids = _ids(6)
    base = runner.leaky_nll(ids, cfg)["nll"]
    moved = 0
    for j in range(L_TEST - 64 * 6 + 40, L_TEST, 64):  # late in a block, far from the start
        changed = list(ids)
        changed[j] = (changed[j] % 255) + 1
        nll = runner.leaky_nll(changed, cfg)["nll"]
        moved += np.max(np.abs(nll[:j - 1] - base[:j - 1])) > 1e-6
    assert moved >= 1


def test_exact_protocols_agree_with_one_exact_forward(runner):
    ids = _ids(3)
    one = runner.leaky_nll(ids, None)["nll"][-SCORED:]  # exact attention is causal
    split = runner.causal_nll(ids[:-SCORED], ids[-SCORED:], None)["nll"]
    np.testing.assert_allclose(split, one, rtol=2e-4, atol=2e-4)


def test_sparse_prefill_records_the_matched_density(runner):
    cfg = matched_config("dhsa", 0.25, L_TEST)
    r = runner.causal_nll(_ids(4)[:-SCORED], _ids(4)[-SCORED:], cfg)
    assert r["density"] == pytest.approx(achieved_density(cfg, L_TEST - SCORED), abs=0.02)
    assert runner.causal_nll(_ids(4)[:-SCORED], _ids(4)[-SCORED:], None)["density"] == 1.0


def test_dense_tail_answers_like_exact_when_the_prefix_is_exact(runner):
    ids = _ids(5)
    full = runner.answer(ids, None, max_new_tokens=6)
    # a budget above the length: the prefix runs dense, the tail exactly
    big = dhsa.DHSAConfig(budget=4096)
    tail = runner.answer(ids, big, max_new_tokens=6, tail=64)
    assert tail["tokens"] == full["tokens"]
    sparse = runner.answer(ids, matched_config("streaming", 0.25, L_TEST), max_new_tokens=6)
    assert 0.22 < sparse["density"] < 0.28
    assert full["sparse_layers"] == [] and sparse["sparse_layers"]  # which layers ran sparse
    assert set(sparse["sparse_layers"]) <= set(runner.layers)
    with pytest.raises(ValueError, match="tail"):
        runner.answer(ids[:10], big, max_new_tokens=2, tail=10)


@pytest.mark.parametrize("method", ["dhsa", "streaming"])
def test_config_dense_tail_is_the_harness_tail(runner, method):
    """DHSAConfig.dense_tail in one forward computes what the harness's tail
    does in two (the method over the prefix, then the tail exactly over its
    cache) when the prefix ends on a block boundary."""
    ids, T = _ids(7), 64
    cfg = matched_config(method, 0.25, L_TEST - T)
    runner._method(cfg)
    past, _ = runner._forward(ids[:-T])
    runner._exact()
    _, two = runner._forward(ids[-T:], past)
    runner._method(cfg.replace(dense_tail=T))
    _, one = runner._forward(ids)
    assert runner._sparse_layers()
    runner._exact()
    np.testing.assert_allclose(one[-1].numpy(), two[-1].numpy(), rtol=1e-4, atol=1e-4)


def test_variants_are_matched_like_their_method():
    from dhsa.harness.protocol import VARIANTS
    L = 2048
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, 2, L, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, L, 16)).astype(np.float32)
    for name, (method, changes) in VARIANTS.items():
        cfg = matched_config(name, 0.125, L)
        assert cfg.method == method
        assert all(getattr(cfg, f) == v for f, v in changes.items())
        assert dhsa.predict_selection(q, k, cfg).density == pytest.approx(0.125, abs=0.003)


# ---- sparse decode ---------------------------------------------------------------

def test_a_full_decode_budget_answers_like_exact_decode(runner):
    ids = _ids(7)
    exact = runner.answer(ids, None, max_new_tokens=6)
    got = runner.answer(ids, None, max_new_tokens=6, decode_budget=4096, step_tail=20)
    assert got["tokens"] == exact["tokens"]
    assert got["decode_density"] == 1.0 and got["decode_rebuilds"] == 0
    cfg = matched_config("dhsa", 0.25, L_TEST)
    small = runner.answer(ids, cfg, max_new_tokens=6, decode_budget=300, step_tail=20)
    assert small["decode_density"] < 300 / L_TEST + 0.01
    assert 0.2 < small["density"] < 0.3  # the prefill's, over what it prefilled
    with pytest.raises(ValueError, match="decode_budget"):
        runner.answer(ids, None, max_new_tokens=2, step_tail=5)
    with pytest.raises(ValueError, match="tail"):
        runner.answer(ids, cfg, max_new_tokens=2, tail=8, decode_budget=300)


def test_decode_continuation_is_exact_at_a_full_budget_and_causal_at_a_small_one(runner):
    ids = _ids(8)
    prefix, cont = ids[:-48], ids[-48:]
    exact = runner.causal_nll(prefix, cont, None)["nll"]
    full = runner.causal_nll(prefix, cont, None, continuation="decode", decode_budget=4096)
    np.testing.assert_allclose(full["nll"], exact, rtol=2e-4, atol=2e-4)
    assert full["decode_density"] == 1.0
    cfg = matched_config("dhsa", 0.25, L_TEST)
    base = runner.causal_nll(prefix, cont, cfg, continuation="decode", decode_budget=256)
    assert base["decode_density"] < 0.2
    for j in (3, 30):
        changed = list(cont)
        changed[j] = (changed[j] % 255) + 1
        nll = runner.causal_nll(prefix, changed, cfg, continuation="decode",
                                decode_budget=256)["nll"]
        np.testing.assert_allclose(nll[:j], base["nll"][:j], rtol=1e-6, atol=1e-7)
        assert nll[j] != base["nll"][j]
    with pytest.raises(ValueError, match="decode"):
        runner.causal_nll(prefix, cont, cfg, continuation="decode")


def test_with_decode_sets_every_decode_option():
    from dhsa.harness.protocol import EXACT_PREFILL, with_decode
    cfg = with_decode(None, 512, 4, "bounds")
    assert (cfg.decode_budget, cfg.decode_reuse, cfg.decode_score) == (512, 4, "bounds")
    assert cfg.budget == EXACT_PREFILL.budget
    base = dhsa.DHSAConfig(budget=1024)
    assert with_decode(base, 512, 1, base.decode_score).replace(decode_budget=None) == base
    assert with_decode(base, 512).decode_score == "mean"  # the harness records "mean" as None
