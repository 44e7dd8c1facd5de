"""dhsa.harness.viz: every picture builds headless and shows what it claims."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")
import dhsa  # noqa: E402
from dhsa.harness import viz  # noqa: E402
from dhsa.harness.eval import niah_score, rouge1_f1, NEEDLE  # noqa: E402


@pytest.fixture
def selection():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 256, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 256, 16)).astype(np.float32)
    cfg = dhsa.DHSAConfig(budget=64, block_size=16, sink=8, local=24)
    return dhsa.predict_selection(q, k, cfg, return_scores=True)


def test_selection_image_counts_groups(selection):
    img = viz.selection_image(selection)
    assert img.shape == (16, 256)
    assert img.max() == selection.groups
    # every block keeps its sink and its own keys in every group
    assert np.all(img[:, :8] == selection.groups)
    assert img[5, 95] == selection.groups and img[5, 96] == 0  # causal edge of block 5


def test_figures_build(selection, tmp_path):
    figs = [viz.plot_selection(selection, mark=(40, 44)),
            viz.plot_chunk_scores(selection),
            viz.plot_boundaries_over_tokens([f"t{i}" for i in range(256)],
                                            selection.boundaries[0], scores=np.random.rand(256)),
            viz.plot_recall_curves([{"method": m, "budget": b, "recall": r}
                                    for m, r0 in (("dhsa", .8), ("streaming", .7))
                                    for b, r in ((256, r0), (512, r0 + .1))]),
            viz.plot_layer_stats(np.random.rand(4, 3)),
            viz.plot_niah([{"length": L, "depth": d, "score": 10.0 * d}
                           for L in (1024, 2048) for d in (0.0, 0.5, 1.0)])]
    for i, f in enumerate(figs):
        p = tmp_path / f"f{i}.png"
        f.savefig(p)
        assert p.stat().st_size > 1000
    assert "mean 5.00" in figs[-1].axes[0].get_title()


def test_chunk_scores_need_return_scores():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 64, 8)).astype(np.float32)
    sel = dhsa.predict_selection(q, q[:, :1], dhsa.DHSAConfig(budget=40, block_size=8, sink=4,
                                                              local=24))
    with pytest.raises(ValueError, match="return_scores"):
        viz.plot_chunk_scores(sel)


def test_niah_scoring_on_known_strings():
    assert niah_score(NEEDLE) == pytest.approx(10.0)
    assert niah_score("") == 0.0
    assert niah_score("pizza near mars") == 0.0
    # "pizza on the moon": "on" and "the" overlap: p = 2/4, r = 2/21
    assert niah_score("pizza on the moon") == pytest.approx(10 * 2 * (0.5 * 2 / 21) / (0.5 + 2 / 21))
    # "eat a sandwich and sit in Dolores Park": 8 of the needle.s 21 words
    f1 = rouge1_f1("eat a sandwich and sit in Dolores Park", NEEDLE)
    p, r = 8 / 8, 8 / 21
    assert f1 == pytest.approx(2 * p * r / (p + r))
    assert niah_score("EAT A SANDWICH, and sit in Dolores Park!") == pytest.approx(10 * f1)
