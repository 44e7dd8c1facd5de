"""dhsa.rules against the rules written out longhand: visibility, block
geometry, the clamp, the masked softmax, the head mapping, pair counts."""
import itertools

import numpy as np
import pytest

from dhsa import rules

CASES = [(Lq, Lk, causal, window) for Lq, Lk in ((1, 1), (5, 5), (3, 11), (17, 40), (40, 40))
         for causal in (True, False) for window in (None, 1, 4, 64)]


@pytest.mark.parametrize("Lq, Lk, causal, window", CASES)
def test_visibility_is_the_definition(Lq, Lk, causal, window):
    want = np.zeros((Lq, Lk), dtype=bool)
    for i, j in itertools.product(range(Lq), range(Lk)):
        p = Lk - Lq + i
        ok = j <= p if causal else True
        if window is not None:
            ok = ok and j > p - window and (causal or j < p + window)
        want[i, j] = ok
    np.testing.assert_array_equal(rules.visible_mask(Lq, Lk, causal, window), want)
    np.testing.assert_array_equal(rules.visible_rows(Lq, Lk, 1, Lq, causal, window), want[1:])
    assert rules.allowed_pairs(Lq, Lk, causal, window) == int(want.sum())
    for bs in (1, 4, 16):
        for qb in range(-(-Lq // bs)):
            g = rules.block_geometry(Lq, Lk, bs, qb, causal, window)
            rows = want[g.i0:g.i0 + g.nq]
            assert (g.spos, g.epos) == (Lk - Lq + g.i0, Lk - Lq + g.i0 + g.nq - 1)
            seen = np.nonzero(rows.any(axis=0))[0]
            assert (g.lo, g.hi) == (seen[0], seen[-1] + 1)  # the keys the block may see


def test_causal_pair_counts():
    assert rules.allowed_pairs(7) == 28
    assert rules.allowed_pairs(3, 10) == 8 + 9 + 10
    assert rules.allowed_pairs(3, 10, causal=False) == 30
    assert rules.allowed_pairs(131072) == 131072 * 131073 // 2


def test_forced_keys_and_clamp():
    g = rules.block_geometry(1000, 1000, 64, 10)            # positions 640..703
    assert rules.forced_ranges(g, 64, 256) == (64, 384, 704, 64 + 320)
    g0 = rules.block_geometry(1000, 1000, 64, 0)
    assert rules.forced_ranges(g0, 64, 256) == (64, 64, 64, 64)  # the sink covers the block
    kw = dict(budget=512, density=0.25, min_budget=100, max_budget=900)
    assert rules.budget_clamp(704, 384, mode="tokens", **kw) == (512, 512)
    assert rules.budget_clamp(704, 600, mode="tokens", **kw) == (600, 600)
    assert rules.budget_clamp(701, 50, mode="density", **kw) == (176, 176)  # ceil(175.25)
    assert rules.budget_clamp(704, 384, mode="adaptive", **kw) == (384, 900)


def test_masked_softmax():
    s = np.array([[1.0, 2.0, 3.0], [5.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    m = np.array([[True, True, False], [False, True, True], [False, False, False]])
    p = rules.masked_softmax(s, m)
    np.testing.assert_allclose(p[0], [1 / (1 + np.e), np.e / (1 + np.e), 0.0])
    np.testing.assert_allclose(p[1], [0.0, 1 / (1 + np.e), np.e / (1 + np.e)])
    np.testing.assert_array_equal(p[2], 0.0)  # a fully masked row: zeros, not NaN
    w, z = rules.masked_softmax_weights(s, m)
    np.testing.assert_array_equal(z[2], 0.0)
    np.testing.assert_allclose(rules.softcap_logits(np.array([0.0, 100.0]), 5.0), [0.0, 5.0])
    assert rules.softcap_logits(s, None) is s


@pytest.mark.parametrize("H, Hkv", [(4, 4), (6, 2), (9, 3), (8, 1)])
def test_head_mapping(H, Hkv):
    x = np.arange(Hkv)[None, :, None, None] * np.ones((2, Hkv, 3, 1))
    e = rules.expand_kv(x, H)
    assert [int(e[0, h, 0, 0]) for h in range(H)] == [rules.kv_head_of(h, H, Hkv) for h in range(H)]
    for gran in rules.GRANULARITIES:
        groups = rules.selection_groups(gran, H, Hkv)
        owners = {}
        for g in range(groups):
            heads, kvs = rules.group_heads(gran, H, Hkv, g)
            assert kvs == [rules.kv_head_of(h, H, Hkv) for h in heads]
            for h in heads:
                assert rules.group_of_head(groups, H, h) == g
                owners[h] = g
        assert sorted(owners) == list(range(H))  # every head in exactly one group
        assert rules.chunk_groups(gran, Hkv) == (1 if gran == "layer" else Hkv)
        assert rules.head_pairs(np.arange(2 * groups), groups, H) == \
            sum(range(2 * groups)) * (H // groups)
    with pytest.raises(ValueError, match="multiple"):
        rules.head_pairs([1], 5, 8)


def test_selection_mask():
    offsets = [0, 1, 3]  # block 0: [0, 3); block 1: [0, 2) and [5, 6)
    starts, ends = np.array([0, 0, 5], np.int32), np.array([3, 2, 6], np.int32)
    m = rules.selection_mask(offsets, starts, ends, 1, 1, 6, 6, 4)
    assert m.shape == (1, 1, 6, 6)
    assert m[0, 0, :4].tolist() == [[True] * 3 + [False] * 3] * 4
    assert m[0, 0, 4:].tolist() == [[True, True, False, False, False, True]] * 2
