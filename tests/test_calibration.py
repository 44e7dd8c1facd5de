"""Calibration: the budget allocation, the file (round trip, corrupt or foreign
files refused by name), DHSAConfig(calibration=...), and its use by the patch
on tiny random models (per-KV-head densities, dense layers, shape checks)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import dhsa
from dhsa.calibration import Calibration, allocate, from_curves, load_calibration


def make(**kw) -> Calibration:
    base = dict(model="tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                target_density=0.25, layers=(0, 1), scales=((0.5, 1.5), (1.0, 1.0)))
    base.update(kw)
    return Calibration(**base)


# ------------------------------------------------------------------ allocation

def test_allocate_gives_budget_where_recall_grows():
    dens = np.array([[0.1, 0.2, 0.4], [0.1, 0.2, 0.4]])
    rec = np.array([[0.50, 0.52, 0.53],    # a local head: more keys buy little
                    [0.30, 0.60, 0.90]])   # a retrieval head
    idx = allocate(dens, rec, target=0.25)
    assert list(idx) == [0, 2]
    assert dens[[0, 1], idx].mean() <= 0.25 + 1e-12


def test_allocate_keeps_the_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0.02, 1.0, (12, 7)), axis=1)
    d[:, 0] = 0.02  # the start (every head at its first step) fits every target
    r = np.sort(rng.uniform(0.2, 1.0, (12, 7)), axis=1)
    for target in (0.1, 0.3, 0.6):
        a, b = allocate(d, r, target), allocate(d, r, target)
        assert np.array_equal(a, b)
        chosen = d[np.arange(12), a]
        assert chosen.mean() <= target + 1e-12
        # not wasteful: no single head could still be raised a step within the target
        for h in range(12):
            if a[h] + 1 < 7:
                assert chosen.sum() - chosen[h] + d[h, a[h] + 1] > target * 12 - 1e-12 or \
                    r[h, a[h] + 1] <= r[h, a[h]]
    with pytest.raises(ValueError, match="same shape|one shape"):
        allocate(d, r[:, :3], 0.2)
    with pytest.raises(ValueError, match="finite"):
        allocate(np.array([[np.nan]]), np.array([[1.0]]), 0.2)


def test_from_curves_picks_multipliers_per_head():
    curves = {0: (np.array([[0.1, 0.2, 0.4]]), np.array([[0.5, 0.52, 0.53]]), (0.5, 1.0, 2.0)),
              1: (np.array([[0.1, 0.2, 0.4]]), np.array([[0.3, 0.6, 0.9]]), (0.5, 1.0, 2.0))}
    shape = dict(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    cal = from_curves("m", shape, 0.25, curves, {"density": 0.2}, {})
    assert cal.scales == ((0.5,), (2.0,))
    assert dict(cal.fit)["density_measured"] == pytest.approx(0.25)


# ------------------------------------------------------------------ the file

def test_round_trip(tmp_path):
    cal = make(dense_layers=(1,), base=(("density", 0.2),), fit=(("tokens", 100),))
    path = tmp_path / "c.json"
    cal.save(path)
    back = load_calibration(path)
    assert back == cal and back.dense_layers == (1,) and dict(back.fit) == {"tokens": 100}
    assert dhsa.DHSAConfig(budget_mode="density", calibration=str(path)).calibration == cal
    assert dhsa.DHSAConfig(budget_mode="density", calibration=path).calibration == cal


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="other"), "not a dhsa calibration"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.pop("shape"), "malformed"),
    (lambda d: d["budgets"].update({"0": [1.0]}), "1 KV-head scales"),
    (lambda d: d["budgets"].update({"7": [1.0, 1.0]}), "layer 7"),
    (lambda d: d["budgets"].update({"0": [1.0, -2.0]}), "finite and > 0"),
    (lambda d: d["budgets"].update({"0": [1.0, float("nan")]}), "finite and > 0"),
    (lambda d: d.update(target_density=0), "target_density"),
    (lambda d: d["shape"].update(num_heads=3), "multiple"),
    (lambda d: d.update(dense_layers=[5]), "dense layer 5"),
])
def test_corrupt_files_are_refused_by_name(tmp_path, edit, match):
    d = make().to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match) as e:
        load_calibration(path)
    assert "bad.json" in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tmp_path / "none.json")
    p = tmp_path / "cut.json"
    p.write_text(json.dumps(make().to_dict())[:40])
    with pytest.raises(ValueError, match="not valid JSON"):
        dhsa.DHSAConfig(budget_mode="density", calibration=p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_calibration(p)


def test_config_rules():
    cal = make()
    with pytest.raises(ValueError, match="budget_mode='density'"):
        dhsa.DHSAConfig(calibration=cal)
    with pytest.raises(TypeError, match="calibration"):
        dhsa.DHSAConfig(budget_mode="density", calibration=3)
    cfg = dhsa.DHSAConfig(budget_mode="density", density=0.25, calibration=cal)
    assert hash(cfg) == hash(cfg.replace())
    assert cal.config_for(cfg, 0, 0).density == pytest.approx(0.125)
    assert cal.config_for(cfg, 0, 1).density == pytest.approx(0.375)
    assert cal.config_for(cfg, 0).density == pytest.approx(0.25)      # the mean, for "layer"
    assert cal.config_for(cfg, 5, 1).density == 0.25                  # not calibrated: as given
    assert cal.config_for(cfg, 0, 0).calibration is None
    big = make(scales=((8.0, 8.0), (1.0, 1.0)))
    assert big.config_for(cfg, 0, 1).density == 1.0                   # clamped to dense
    q = np.zeros((1, 4, 32, 16), np.float32)
    k = np.zeros((1, 2, 32, 16), np.float32)
    with pytest.raises(ValueError, match="per layer and KV head"):
        dhsa.sparse_attention(q, k, k, cfg)
    with pytest.raises(ValueError, match="per layer and KV head"):
        dhsa.predict_selection(q, k, cfg)
    with pytest.raises(ValueError, match="num_kv_heads=2, this attention call has 1"):
        cal.check_shape(4, 1, 16, 0)
    with pytest.raises(ValueError, match="head_dim=16"):
        cal.check_shape(4, 2, 64, 0)


# ------------------------------------------------------------------ in a model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from test_patching import assert_close, build, logits, tokens  # noqa: E402

BASE = dhsa.DHSAConfig(budget_mode="density", density=0.25, block_size=16, sink=8, local=32,
                       boundary_window=8, nms_radius=8)


def tiny_cal(scales, **kw):
    return make(head_dim=16, scales=scales, **kw)


def test_uniform_calibration_changes_nothing():
    model = build("llama")
    ids = tokens(1, 400)
    dhsa.patch(model, BASE)
    ref = logits(model, ids)
    dhsa.unpatch(model)
    h = dhsa.patch(model, BASE.replace(calibration=tiny_cal(((1.0, 1.0), (1.0, 1.0)))))
    out = logits(model, ids)
    assert torch.equal(out, ref)
    assert {r.path for r in h.stats} == {"sparse"}


def test_per_head_densities_are_applied_per_kv_head():
    model = build("llama")
    ids = tokens(1, 400)
    cal = tiny_cal(((0.5, 3.0), (1.0, 1.0)))
    h = dhsa.patch(model, BASE.replace(calibration=cal))
    out = logits(model, ids)
    dens = {r.layer: r.density for r in h.stats}
    dhsa.unpatch(model)
    # layer 0 by hand: KV head 0 at density 0.125, KV head 1 at 0.75
    seen = {}

    def spy(q, k, v, config=None, **kw):
        seen.setdefault(q.shape[1], []).append(config.density)
        return real(q, k, v, config, **kw)

    import dhsa.patching.forward as fw
    real = fw.sparse_attention
    fw.sparse_attention = spy
    try:
        h2 = dhsa.patch(model, BASE.replace(calibration=cal))
        out2 = logits(model, ids)
    finally:
        fw.sparse_attention = real
    assert torch.equal(out, out2)
    assert seen[2][:2] == [pytest.approx(0.125), pytest.approx(0.75)]   # layer 0, per KV head
    assert seen[4] == [pytest.approx(0.25)]                              # layer 1, one call
    assert dens[0] > dens[1]        # the retrieval head's extra keys outweigh the cut
    dhsa.unpatch(model)
    # the calibrated output differs from the uniform one, and a head at density 1 is exact
    dhsa.patch(model, BASE)
    assert not torch.equal(logits(model, ids), out)
    dhsa.unpatch(model)
    dense_ref = logits(model, ids)
    h3 = dhsa.patch(model, BASE.replace(calibration=tiny_cal(((8.0, 8.0), (8.0, 8.0)))))
    assert_close(logits(model, ids), dense_ref)
    assert all(r.density == pytest.approx(1.0) for r in h3.stats)


def test_dense_layers_and_wrong_model():
    model = build("llama")
    ids = tokens(1, 300)
    h = dhsa.patch(model, BASE.replace(calibration=tiny_cal(((1.0, 1.0), (1.0, 1.0)),
                                                            dense_layers=(1,))))
    logits(model, ids)
    paths = {r.layer: r.path for r in h.stats}
    assert paths == {0: "sparse", 1: "dense"}
    dhsa.unpatch(model)
    dhsa.patch(model, BASE.replace(calibration=make(head_dim=32)))
    with pytest.raises(ValueError, match="head_dim=32, this attention call has 16"):
        logits(model, ids)
    dhsa.unpatch(model)


def test_fit_on_a_tiny_model_is_deterministic(tmp_path):
    from dhsa.harness.calibrate import fit_calibration
    model = build("llama")
    ids = tokens(1, 384)
    a = fit_calibration(model, ids, BASE, name="tiny", multipliers=(0.5, 1.0, 2.0))
    b = fit_calibration(model, ids, BASE, name="tiny", multipliers=(0.5, 1.0, 2.0))
    assert a == b
    assert a.layers == (0, 1) and a.num_kv_heads == 2 and a.head_dim == 16
    fit = dict(a.fit)
    assert fit["density_measured"] <= a.target_density + 1e-12
    assert fit["recall_measured"] >= fit["recall_uniform"] - 0.02
    a.save(tmp_path / "t.json")
    h = dhsa.patch(model, BASE.replace(calibration=tmp_path / "t.json"))
    logits(model, ids)
    assert {r.path for r in h.stats} == {"sparse"}
    dhsa.unpatch(model)
