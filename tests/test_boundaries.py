"""Learned chunk boundaries: the C scorer against the float64 reference, the
labels against a brute-force L x L computation, the fit, bad models refused
by name, the calibration file, and their use by the patch."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import dhsa
from dhsa import reference as ref
from dhsa.calibration import Calibration, load_calibration
from dhsa.harness.boundaries import boundary_labels, fit_boundary_model

CFG = dhsa.DHSAConfig(budget=64, block_size=16, sink=4, local=24, boundary_window=4,
                      nms_radius=2, min_chunk=2, max_chunk=12)


def qk(L=300, H=4, Hkv=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, H, L, D)).astype(np.float32)
    k = rng.standard_normal((1, Hkv, L, D)).astype(np.float32)
    return q, k


def random_model(rows, W, seed=1, threshold=0.0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((rows, 2 * W + ref.BMODEL_TAIL))
    m[:, -1] = threshold
    return m


def cosine_model(rows, W, threshold):
    """The row whose learned score is the cosine score: weight 1 on 1 - cos."""
    m = np.zeros((rows, 2 * W + ref.BMODEL_TAIL))
    m[:, 2 * W] = 1.0
    m[:, -1] = threshold
    return m


def ref_predict(q, k, cfg, model):
    return ref.predict(q, k, block_size=cfg.block_size, sink=cfg.sink, local=cfg.local,
                       budget=cfg.budget, granularity=cfg.granularity,
                       boundary_window=cfg.boundary_window, threshold=cfg.threshold,
                       min_len=cfg.min_chunk, max_len=cfg.max_chunk, nms_radius=cfg.nms_radius,
                       boundary_model=model)


# ------------------------------------------------------------------ the scorer

def test_features_and_scores_match_the_cosine_definition():
    _, k = qk()
    F = ref.boundary_features(k[0, :1], 4)
    cos = ref.boundary_scores(k[0, :1], 4)
    assert F.shape == (300, 2 * 16 + 4)
    np.testing.assert_allclose(F[:, 32], cos, rtol=0, atol=1e-12)
    # |a - b|^2 is the sum of the squared terms; a.b the sum of the products
    np.testing.assert_allclose(F[:, 33] ** 2, F[:, :16].sum(1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.learned_boundary_scores(k[0, :1], 4,
                                                           cosine_model(1, 16, 0.3)[0]), cos,
                               atol=1e-12)


@pytest.mark.parametrize("granularity", ["kv_head", "query_head", "layer"])
def test_c_boundaries_match_the_reference(granularity):
    q, k = qk()
    cfg = CFG.replace(granularity=granularity)
    heads = 2 if granularity == "layer" else 1
    rows = 1 if granularity == "layer" else 2
    for seed in range(4):
        model = random_model(rows, heads * 16, seed=seed, threshold=0.1 * seed)
        sel = dhsa.predict_selection(q, k, cfg, boundary_model=model)
        want = ref_predict(q, k, cfg, model)
        assert len(sel.boundaries) == len(want["bounds"]) == rows
        for got, exp in zip(sel.boundaries, want["bounds"]):
            assert np.array_equal(got, exp)
        assert np.array_equal(sel.starts, want["starts"]) and np.array_equal(sel.ends, want["ends"])


def test_a_cosine_row_gives_the_cosine_chunking():
    q, k = qk(seed=3)
    cfg = CFG.replace(threshold=0.15)
    plain = dhsa.predict_selection(q, k, cfg)
    learned = dhsa.predict_selection(q, k, cfg, boundary_model=cosine_model(2, 16, 0.15))
    for a, b in zip(plain.boundaries, learned.boundaries):
        assert np.array_equal(a, b)
    # a random row moves them (so the row is really read)
    other = dhsa.predict_selection(q, k, cfg, boundary_model=random_model(2, 16))
    assert any(not np.array_equal(a, b) for a, b in zip(plain.boundaries, other.boundaries))


def test_each_row_brings_its_threshold():
    q, k = qk(seed=4)
    m = cosine_model(2, 16, 0.0)
    m[1, -1] = 5.0                       # no cosine score reaches 5: only max_chunk cuts
    sel = dhsa.predict_selection(q, k, CFG, boundary_model=m)
    assert np.all(np.diff(sel.boundaries[1])[:-1] == CFG.max_chunk)
    assert len(sel.boundaries[0]) > len(sel.boundaries[1])


def test_learned_chunking_is_causal():
    """Appending keys moves no boundary before Lk - lookahead."""
    q, k = qk(L=400, seed=5)
    model = random_model(2, 16, seed=7)
    full = dhsa.predict_selection(q, k, CFG, boundary_model=model)
    for L in (150, 237, 321):
        part = dhsa.predict_selection(q[:, :, :L], k[:, :, :L], CFG, boundary_model=model)
        limit = L - CFG.lookahead
        for a, b in zip(part.boundaries, full.boundaries):
            assert np.array_equal(a[a < limit], b[b < limit])


def test_threads_and_full_budget():
    q, k = qk(seed=6)
    v = np.random.default_rng(9).standard_normal(k.shape).astype(np.float32)
    model = random_model(2, 16, seed=2)
    o1 = dhsa.sparse_attention(q, k, v, CFG, boundary_model=model, num_threads=1)
    o2 = dhsa.sparse_attention(q, k, v, CFG, boundary_model=model, num_threads=2)
    assert np.array_equal(o1, o2)
    # budget >= Lk keeps every key: exact attention, whatever the boundaries
    out, info = dhsa.sparse_attention(q, k, v, CFG.replace(budget=400), boundary_model=model,
                                      return_info=True)
    assert info.density == 1.0
    np.testing.assert_allclose(out, dhsa.dense_attention(q, k, v), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros((3, 38)), ValueError, r"shape \(2, 38\)"),
    (np.zeros((2, 37)), ValueError, r"shape \(2, 38\)"),
    (np.zeros(38), ValueError, r"shape \(2, 38\)"),
    ("model", TypeError, "2-D array of reals"),
    (np.full((2, 38), np.nan), ValueError, r"boundary_model\[0, 0\] is not finite"),
])
def test_bad_models_are_refused_by_name(bad, err, match):
    q, k = qk()
    with pytest.raises(err, match=match):
        dhsa.predict_selection(q, k, CFG, boundary_model=bad)
    with pytest.raises(err, match=match):
        dhsa.sparse_attention(q, k, k, CFG, boundary_model=bad)


def test_models_where_they_cannot_apply():
    q, k = qk()
    m = random_model(2, 16)
    with pytest.raises(ValueError, match="chunking='dynamic'"):
        dhsa.predict_selection(q, k, CFG.replace(chunking="fixed"), boundary_model=m)
    bounds = [np.array([0, 100, 300])] * 2
    with pytest.raises(ValueError, match="not both"):
        dhsa.predict_selection(q, k, CFG, boundaries=bounds, boundary_model=m)
    with pytest.raises(ValueError, match="does not chunk"):
        dhsa.predict_selection(q, k, CFG.replace(method="streaming"), boundary_model=m)
    sel = dhsa.predict_selection(q, k, CFG)
    with pytest.raises(TypeError, match="given selection"):
        dhsa.sparse_attention(q, k, k, CFG, selection=sel, boundary_model=m)


# ------------------------------------------------------------------ labels and fit

def brute_labels(q, k, w, scale):
    H, L = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    out = np.zeros((Hkv, L))
    for g in range(Hkv):
        diff = np.zeros(L)
        mass = np.zeros(L)
        for h in range(g * H // Hkv, (g + 1) * H // Hkv):
            s = q[0, h].astype(np.float64) @ k[0, g].astype(np.float64).T * scale
            s[np.triu_indices(L, 1)] = -np.inf
            P = np.exp(s - s.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            for t in range(w, L - w + 1):
                for i in range(t + w, L):
                    a, b = P[i, t - w:t].sum(), P[i, t:t + w].sum()
                    diff[t] += abs(a - b)
                    mass[t] += a + b
        out[g] = np.divide(diff, mass, out=np.zeros(L), where=mass > 0)
    return out


def test_labels_match_a_brute_force_computation():
    q, k = qk(L=60, H=4, Hkv=2, D=8, seed=11)
    want = brute_labels(q, k, 3, 8 ** -0.5)
    for block in (7, 256):
        got = boundary_labels(q, k, 3, block=block)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert np.all(got[:, :3] == 0) and np.all(got[:, -2:] == 0)
    assert 0 < got.max() <= 1


def test_fit_is_deterministic_keeps_the_chunk_count_and_learns():
    rng = np.random.default_rng(0)
    L, D = 400, 16
    # keys in segments: inside a segment they share a direction, so attention
    # of later queries changes at the segment edges
    edges = np.sort(rng.choice(np.arange(8, L - 8), 30, replace=False))
    seg = np.searchsorted(edges, np.arange(L), side="right")
    dirs = rng.standard_normal((31, D)) * 2
    k = (dirs[seg] + 0.3 * rng.standard_normal((L, D))).astype(np.float32)[None, None]
    q = (dirs[rng.integers(0, 31, L)] + 0.3 * rng.standard_normal((L, D))).astype(np.float32)
    q = np.repeat(q[None, None], 2, axis=1)
    cfg = CFG.replace(min_chunk=2, max_chunk=16)
    lab = boundary_labels(q, k, 4)[0]
    a = fit_boundary_model(k[0], lab, cfg)
    b = fit_boundary_model(k[0], lab, cfg)
    assert np.array_equal(a, b) and a.shape == (2 * D + ref.BMODEL_TAIL,)
    pred = ref.learned_boundary_scores(k[0], 4, a)
    cos = ref.boundary_scores(k[0], 4)
    used = lab > 0
    # the fitted score follows the labels better than the cosine does
    r_fit = np.corrcoef(pred[used], lab[used])[0, 1]
    r_cos = np.corrcoef(cos[used], lab[used])[0, 1]
    assert r_fit > r_cos and r_fit > 0.5
    n_cos = len(ref.find_boundaries(cos, cfg.threshold, 2, 16, cfg.nms_radius))
    n_fit = len(ref.find_boundaries(pred, a[-1], 2, 16, cfg.nms_radius))
    assert abs(n_fit - n_cos) <= 2
    with pytest.raises(ValueError, match="too few labelled"):
        fit_boundary_model(k[0], np.zeros(L), cfg)


def test_choose_thresholds_keeps_the_best_quantile_per_head():
    from dhsa.analysis import dense_probabilities, recall_from_probabilities
    from dhsa.harness.boundaries import choose_thresholds
    q, k = qk(L=256, seed=12)
    cfg = CFG.replace(budget_mode="density", density=0.3, nms_radius=1)
    models = random_model(2, 16, seed=5)
    P = dense_probabilities(q, k)
    got = choose_thresholds(q, k, P, cfg, models, quantiles=(0.5, 0.7, 0.9))
    assert np.array_equal(got[:, :-1], models[:, :-1])      # only the thresholds change
    assert np.array_equal(got, choose_thresholds(q, k, P, cfg, models, quantiles=(0.5, 0.7, 0.9)))

    def head_recall(m):
        sel = dhsa.predict_selection(q, k, cfg, boundary_model=m)
        return recall_from_probabilities(P, sel).reshape(2, -1).mean(1)

    best = head_recall(got)
    for qu in (0.5, 0.7, 0.9):
        trial = models.copy()
        trial[:, -1] = [np.quantile(ref.learned_boundary_scores(k[0, g:g + 1], 4, models[g])[1:],
                                    qu) for g in range(2)]
        assert np.all(best >= head_recall(trial) - 1e-12)


# ------------------------------------------------------------------ the calibration file

def make(**kw) -> Calibration:
    base = dict(model="tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                target_density=0.25, layers=(0, 1), scales=((1.0, 1.0), (1.0, 1.0)),
                boundary_window=4, boundary_nms_radius=1, boundary_layers=(0,),
                boundary_models=(tuple(tuple(r) for r in random_model(2, 16)),))
    base.update(kw)
    return Calibration(**base)


def test_file_round_trip_and_version_1(tmp_path):
    cal = make()
    cal.save(tmp_path / "c.json")
    back = load_calibration(tmp_path / "c.json")
    assert back == cal
    assert np.array_equal(back.boundary_model_for(0), random_model(2, 16))
    assert np.array_equal(back.boundary_model_for(0, 1), random_model(2, 16)[1:2])
    assert back.boundary_model_for(1) is None
    d = cal.to_dict()
    d["version"] = 1
    d.pop("boundaries")
    (tmp_path / "v1.json").write_text(json.dumps(d))
    old = load_calibration(tmp_path / "v1.json")
    assert old.boundary_layers == () and old.boundary_model_for(0) is None


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["boundaries"]["models"]["0"].pop(), "1 boundary models"),
    (lambda d: d["boundaries"]["models"]["0"][0].pop(), "37 values, head_dim 16 needs 38"),
    (lambda d: d["boundaries"]["models"]["0"][1].__setitem__(3, "x"), "finite numbers"),
    (lambda d: d["boundaries"].update(window=0), "boundary window"),
    (lambda d: d["boundaries"].update(nms_radius=-1), "boundary nms_radius"),
    (lambda d: d["boundaries"]["models"].update({"9": d["boundaries"]["models"]["0"]}),
     "boundary layer 9"),
])
def test_corrupt_boundaries_are_refused_by_name(tmp_path, edit, match):
    d = make().to_dict()
    edit(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match) as e:
        load_calibration(tmp_path / "bad.json")
    assert "bad.json" in str(e.value)


def test_config_rules_for_learned_boundaries():
    cal = make()
    base = dhsa.DHSAConfig(budget_mode="density", density=0.25, block_size=16, sink=8,
                           local=32, boundary_window=8, nms_radius=8)
    cfg = base.replace(calibration=cal)
    assert cal.config_for(cfg, 0, 0).boundary_window == 4     # the window the models read
    assert cal.config_for(cfg, 0, 0).nms_radius == 1          # the scan they were tuned with
    assert cal.config_for(cfg, 1, 0).boundary_window == 8     # no models in layer 1
    assert cal.config_for(cfg, 1, 0).nms_radius == 8
    only = cal.chunking_for(cfg, 0)                           # the chunking, budgets as given
    assert (only.boundary_window, only.nms_radius, only.density) == (4, 1, 0.25)
    assert only.calibration is None and cal.chunking_for(cfg, 1) == base
    with pytest.raises(ValueError, match="chunking='dynamic'"):
        base.replace(chunking="fixed", calibration=cal)
    with pytest.raises(ValueError, match="granularity='layer'"):
        base.replace(granularity="layer", calibration=cal)


# ------------------------------------------------------------------ in a model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from test_patching import build, logits, tokens  # noqa: E402

BASE = dhsa.DHSAConfig(budget_mode="density", density=0.25, block_size=16, sink=8, local=32,
                       boundary_window=8, nms_radius=8)


def test_the_patch_chunks_with_the_learned_models():
    model = build("llama")
    ids = tokens(1, 400)
    dhsa.patch(model, BASE)
    plain = logits(model, ids)
    dhsa.unpatch(model)
    # cosine rows with the config's own window and threshold: the same model output
    same = make(boundary_window=8, boundary_nms_radius=8, boundary_layers=(0, 1),
                boundary_models=tuple(tuple(tuple(r) for r in cosine_model(2, 16, BASE.threshold))
                                      for _ in range(2)))
    h = dhsa.patch(model, BASE.replace(calibration=same))
    assert torch.equal(logits(model, ids), plain)
    dhsa.unpatch(model)
    # random rows: each layer's call gets its rows, and its chunks are theirs
    cal = make(boundary_window=8, boundary_nms_radius=8)
    seen = []

    def spy(q, k, v, config=None, **kw):
        out = real(q, k, v, config, **kw)
        seen.append((kw.get("boundary_model"), config,
                     dhsa.predict_selection(q, k, config, scale=kw.get("scale"),
                                            boundary_model=kw.get("boundary_model")),
                     out[1].selection))
        return out

    import dhsa.patching.forward as fw
    real = fw.sparse_attention
    fw.sparse_attention = spy
    try:
        dhsa.patch(model, BASE.replace(calibration=cal))
        out = logits(model, ids)
    finally:
        fw.sparse_attention = real
    dhsa.unpatch(model)
    assert not torch.equal(out, plain)
    assert len(seen) == 2                                  # one call per layer
    assert np.array_equal(seen[0][0], cal.boundary_model_for(0)) and seen[1][0] is None
    for bm, config, want, got in seen:
        for a, b in zip(want.boundaries, got.boundaries):
            assert np.array_equal(a, b)


def test_fit_with_boundaries_on_a_tiny_model(tmp_path):
    from dhsa.harness.calibrate import fit_calibration
    model = build("llama")
    ids = tokens(1, 384)
    a = fit_calibration(model, ids, BASE, name="tiny", multipliers=(0.5, 1.0, 2.0),
                        boundaries=True, boundary_window=4)
    b = fit_calibration(model, ids, BASE, name="tiny", multipliers=(0.5, 1.0, 2.0),
                        boundaries=True, boundary_window=4)
    assert a == b
    assert a.boundary_layers == (0, 1) and a.boundary_window == 4
    assert a.boundary_nms_radius == 1
    assert a.boundary_model_for(0).shape == (2, 2 * 16 + ref.BMODEL_TAIL)
    fit = dict(a.fit)
    assert fit["density_measured"] <= a.target_density + 1e-12
    a.save(tmp_path / "t.json")
    h = dhsa.patch(model, BASE.replace(calibration=tmp_path / "t.json"))
    logits(model, ids)
    assert {r.path for r in h.stats} == {"sparse"}
    dhsa.unpatch(model)
    with pytest.raises(ValueError, match="learned boundaries need"):
        fit_calibration(model, ids, BASE.replace(chunking="fixed"), boundaries=True)
