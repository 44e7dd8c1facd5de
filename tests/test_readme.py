"""The README says only what the results files say.

Its tables and result numbers sit in blocks that benchmarks/render_readme.py
writes from benchmarks/results/; these tests fail when the README and the
files disagree (fix: ``python benchmarks/render_readme.py``), and check that
the check itself would notice a changed number.
"""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "render_readme.py"
RESULTS = ROOT / "benchmarks" / "results"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_readme", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(results=RESULTS, readme=ROOT / "README.md"):
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--readme", str(readme),
                           "--results", str(results)], capture_output=True, text=True,
                          timeout=60)


def test_readme_numbers_equal_the_rendered_ones():
    r = _check()
    assert r.returncode == 0, (
        "README.md differs from benchmarks/results/ (run python benchmarks/render_readme.py):\n"
        + r.stdout[-4000:] + r.stderr[-2000:])


def test_check_fails_when_one_number_in_a_results_file_changes(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.log"))
    path = results / "bench_dense.json"
    doc = json.loads(path.read_text())
    doc["rows"][0]["dhsa_ms"] *= 1.5
    path.write_text(json.dumps(doc))
    r = _check(results)
    assert r.returncode == 1
    old = f"| {_renderer().ms(doc['rows'][0]['dhsa_ms'] / 1.5)} |"
    new = f"| {_renderer().ms(doc['rows'][0]['dhsa_ms'])} |"
    removed = [l for l in r.stdout.splitlines() if l.startswith("-|")]
    added = [l for l in r.stdout.splitlines() if l.startswith("+|")]
    assert len(removed) == len(added) == 1
    assert old in removed[0] and new in added[0]


def test_check_fails_when_a_rendered_block_is_edited_by_hand(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    edited = text.replace("<!-- rendered: bench_flex -->\n", "<!-- rendered: bench_flex -->\n"
                          "The outputs agree exactly.\n", 1)
    assert edited != text
    readme.write_text(edited)
    assert _check(readme=readme).returncode == 1


def test_rendering_is_a_pure_function_of_the_files():
    mod = _renderer()
    text = (ROOT / "README.md").read_text()
    once = mod.render(text, RESULTS)
    assert mod.render(once, RESULTS) == once
    assert mod.render(text, RESULTS) == once


def test_every_block_is_used_and_every_results_file_is_read():
    mod = _renderer()
    text = (ROOT / "README.md").read_text()
    names = [m.group(2) for m in mod.BLOCK.finditer(text)]
    assert sorted(names) == sorted(mod.BLOCKS)
    res = mod.Results(RESULTS)
    for name in names:
        mod.BLOCKS[name](res)
    read = {f"{n}.json" for n in res._cache}
    on_disk = {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*.json")}
    assert on_disk <= read, f"results files no README block renders: {sorted(on_disk - read)}"


def test_unknown_block_is_an_error(tmp_path):
    mod = _renderer()
    with pytest.raises(ValueError, match="no renderer knows"):
        mod.render("<!-- rendered: nonsense -->\n<!-- /rendered -->\n", RESULTS)


@pytest.mark.parametrize("stale", [
    "3–4× slower",        # the files give 2.7-3.1x
    "≈ 3 100",            # the property examples sum to another count
    "−42%", "−51%",       # an "earlier run" that no file holds
    "about 390 GFLOP/s",  # the sgemm rate is measured in each run
])
def test_numbers_no_file_holds_are_gone(stale):
    assert stale not in (ROOT / "README.md").read_text()


def test_result_numbers_outside_blocks_are_not_measurements():
    """From the speed section to the layout, no percentage or factor stands
    outside a rendered block: every measured one comes from a file."""
    mod = _renderer()
    text = (ROOT / "README.md").read_text()
    part = text[text.index("<!-- rendered: speed_header -->"):text.index("## Layout")]
    outside = mod.BLOCK.sub("", part)
    # a confidence or significance level ("95% confidence interval", "the 5% level")
    # is a parameter of the statistics, not a result
    found = re.findall(r"\d+(?:\.\d+)?\s?(?:%(?!\s(?:confidence|interval|level|bootstrap))|×(?!\d))", outside)
    assert not found, f"measured-looking numbers outside rendered blocks: {found}"


def test_scoring_block_says_where_dhsa_max_stands(tmp_path):
    """The chunk-score goal sentence follows the numbers: above or below
    vertical_slash, and the share of the oracle."""
    mod = _renderer()

    def doc(ours):
        rows = [dict(row=n, density_target=0.25, recall_mean=v, recall_min_layer=v - 0.1,
                     predict_ms=10.0)
                for n, v in (("dhsa", 0.80), ("dhsa_max (max score, chunks 2-4)", ours),
                             ("vertical_slash", 0.90), ("oracle", 0.95))]
        return {"config": {"model": "m", "length": 4096, "densities": [0.25], "layers": [0, 3],
                           "text": "/x/pg_essays", "offset": 0},
                "rows": rows, "started": "2026-12-02T00:00:00Z", "command": "c",
                "machine": {}}

    for ours, word in ((0.92, "at or above"), (0.88, "below")):
        (tmp_path / "ablate_scoring_m.json").write_text(json.dumps(doc(ours)))
        text = mod.block_scoring(mod.Results(tmp_path))
        assert f"vertical_slash's 0.900 ({word})" in text, text
        assert f"{100 * ours / 0.95:.1f}% of the oracle's 0.950" in text
