"""Seeded, offline long-context tasks scored by exact match.

:func:`make_sample` builds one prompt of a chosen token length for a real
tokenizer: a pass key (Landmark Attention / LongLoRA), the RULER tasks
(needle in a haystack with one key, several keys or several values,
variable tracking, common-word extraction), a long-range copy scored by the
model's loss, and the paper's San Francisco needle in essays. The answer is
checked by :func:`score_output` (whole numbers, whole words, case-insensitive).

Nothing is downloaded and torch is never imported: only a Hugging Face
tokenizer object comes in. Same arguments, same :class:`Sample`.

Layout of every prompt, token by token::

    [prefix: BOS or chat header + intro] [context: haystack sentences with the
    needles at sentence boundaries] [tail: question + answer prefix]

The three parts are tokenized separately (the context sentence by sentence, in
one batch call) and concatenated, so every needle and every sentence has
exact token boundaries.
"""
from __future__ import annotations

import bisect
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .eval import ANSWER_PREFIX as _PG_ANSWER_PREFIX
from .eval import NEEDLE as _PG_NEEDLE
from .eval import QUESTION as _PG_QUESTION
from .eval import haystack_text, rouge1_f1

__all__ = ["TASKS", "HAYSTACKS", "FORMATS", "Sample", "make_sample", "score_output",
           "rouge1_f1", "prompt_format", "minimum_length"]

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
         "common_words", "copy", "pg_niah")
HAYSTACKS = ("noise", "essay")
FORMATS = ("chat", "completion")
SCORINGS = ("all", "share", "loss")

#: the RULER "noise" haystack: these five sentences, over and over
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                   "Here we go.", "There and back again.")

# Plain English words written for this module: keys of the magic-number needles
# ("adjective-noun") and the vocabulary of the common-words list. None of them
# occurs in the noise sentences or in the questions.
_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "brief", "bright", "brisk", "broad", "calm",
    "careful", "cheap", "clean", "clever", "cold", "curious", "damp", "dark", "deep", "dry",
    "dull", "eager", "early", "easy", "empty", "faint", "fair", "famous", "fancy", "fast",
    "fierce", "flat", "fresh", "friendly", "gentle", "giant", "glad", "golden", "grand", "grey",
    "happy", "hard", "heavy", "hidden", "hollow", "honest", "huge", "humble", "icy", "idle",
    "jolly", "keen", "kind", "large", "late", "lazy", "lively", "lonely", "loud", "lucky",
    "mellow", "mighty", "modern", "narrow", "neat", "nervous", "noble", "odd", "pale", "plain",
    "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rich", "rough", "round",
    "rusty", "sharp", "shiny", "short", "silent", "silver", "simple", "slow", "smooth", "soft",
    "solid", "sour", "spicy", "steep", "strange", "sweet", "swift", "tall", "tidy", "wild",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badge", "bakery", "basket", "beach", "bell", "blanket", "boat",
    "bottle", "bridge", "bucket", "butter", "cabin", "camera", "candle", "canyon", "carpet",
    "castle", "cellar", "chair", "cherry", "chimney", "cloud", "clock", "coat", "comet",
    "copper", "cottage", "desert", "diamond", "dolphin", "door", "dragon", "drum", "eagle",
    "engine", "falcon", "feather", "fence", "forest", "fountain", "garden", "garlic", "glacier",
    "guitar", "hammer", "harbor", "helmet", "honey", "island", "jacket", "jungle", "kettle",
    "kitten", "ladder", "lantern", "lemon", "library", "lizard", "magnet", "maple", "marble",
    "meadow", "mirror", "monkey", "mountain", "ocean", "orange", "otter", "oven", "paddle",
    "palace", "panther", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket",
    "pony", "puzzle", "rabbit", "radio", "river", "rocket", "saddle", "salmon", "shadow",
    "shovel", "spider", "spoon", "squirrel", "statue", "tiger", "tomato", "tower", "tractor",
)
_VOCABULARY = _ADJECTIVES + _NOUNS

_PLACEHOLDER = "<<DHSA_CONTEXT>>"
_SLACK = 3               # generation tokens granted beyond a canonical right answer
_MIN_FILLER = 64         # haystack tokens a prompt must have room for, at least
_N_COMMON = 10           # common_words: words to find
_CW_RARE_MIN = 20        # common_words: fewest other words in the list
_COPY_NUMBERS = 64       # copy: numbers in the record
_VT_HOPS = 4             # variable_tracking: assignments after the first
_MULTI = 4               # niah_multikey: needles in all; niah_multivalue: values

_INTRO_NIAH = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize them. I will quiz you about the numbers afterwards.")
_INTRO_PASSKEY = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.")
_INTRO_VT = "Memorize and track the chain(s) of variable assignment hidden in the following text."
_INTRO_CW = ("Below is a numbered list of words. Some of the words appear more often than "
             "others. Memorize the ones that appear most often.")
_INTRO_COPY = ("Somewhere in the following text there is a record of numbers. Memorize it "
               "exactly: you will be asked to repeat it.")
_INTRO_PG = "Read the document and answer the question.\n\nDocument:"

# a sentence: optional leading whitespace, then text up to . ! or ? (and any
# closing quotes / brackets) followed by whitespace or the end of the text
_SENTENCE = re.compile(r"\s*\S.*?[.!?][\"'\)\]\u2019\u201d]*(?=\s|\Z)", re.S)


@dataclass
class Sample:
    """One evaluation prompt with everything needed to score the model on it.

    ``needle_spans[0]`` is the needle placed at ``depth`` (the real one in
    niah_multikey, the first assignment in variable_tracking); the others
    follow in the order of ``meta["needles"]``, which is not always their
    order in the text. Depth counts haystack tokens only: a needle at depth d
    has about d of the haystack's own tokens (``meta["haystack_tokens"]``,
    needles left out) before it; ``meta["needle_depths"]`` gives the exact
    fractions.
    """
    task: str
    length: int            # target tokens: len(prompt_ids) + len(continuation_ids) <= length
    depth: float           # 0..1, where the (first) needle sits in the haystack
    seed: int
    prompt_ids: List[int]  # the whole prompt, ending where the answer starts
    answers: List[str]     # strings the output must contain
    scoring: str           # "all", "share" (see score_output) or "loss" (on continuation_ids)
    max_new_tokens: int    # generation budget: a right answer plus a few tokens
    continuation_ids: List[int] = field(default_factory=list)        # scoring == "loss" only
    needle_spans: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) in prompt_ids
    tail_start: int = 0    # index in prompt_ids where the question (after the context) starts
    meta: Dict[str, Any] = field(default_factory=dict)  # task details: key, values, haystack, ...


# ------------------------------------------------------------------ scoring

def _normalize(text: str) -> str:
    """Lower-cased text with every run of whitespace made one space."""
    return " ".join(str(text).split()).lower()


def _found(answer: str, text: str) -> bool:
    """Whether the (normalized) answer occurs in the (normalized) text as a
    whole number (digits not touching other digits) or whole words."""
    a = _normalize(answer)
    if not a:
        return False
    if a.isdigit():
        pattern = r"(?<!\d)" + re.escape(a) + r"(?!\d)"
    else:
        pattern = r"(?<!\w)" + re.escape(a) + r"(?!\w)"
    return re.search(pattern, text) is not None


def score_output(sample: Sample, text: str) -> float:
    """Score of the generated ``text``: for scoring "all" 1.0 if every answer
    is in it, else 0.0; for "share" the fraction of the answers in it.
    Matching is case-insensitive, whitespace-collapsed, and whole-number /
    whole-word. Raises ValueError for "loss" samples (scored by the loss on
    ``continuation_ids``, not by text)."""
    if sample.scoring == "loss":
        raise ValueError(f"task {sample.task!r} is scored by the loss on continuation_ids, "
                         "not by score_output")
    if sample.scoring not in ("all", "share"):
        raise ValueError(f"unknown scoring {sample.scoring!r}; choose one of {SCORINGS}")
    if not sample.answers:
        raise ValueError("the sample has no answers to score")
    norm = _normalize(text)
    hits = [_found(a, norm) for a in sample.answers]
    if sample.scoring == "all":
        return 1.0 if all(hits) else 0.0
    return sum(hits) / len(hits)


def prompt_format(model_name: str) -> str:
    """The prompt format of a model of the harness: "chat" for the instruct
    SmolLM2, "completion" for the base Gemma-3."""
    from .models import MODELS
    if model_name not in MODELS:
        raise ValueError(f"model_name must be one of {tuple(MODELS)}, got {model_name!r}")
    return MODELS[model_name]


# ------------------------------------------------------------------ tokenizing

def _encode(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Token ids of each text, without special tokens added (one batch call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _encode_unique(tokenizer, texts: Sequence[str], cache: Dict[str, List[int]]) -> None:
    """Fill ``cache`` with the ids of the texts it lacks (one batch call)."""
    new = list(dict.fromkeys(t for t in texts if t not in cache))
    for t, ids in zip(new, _encode(tokenizer, new)):
        cache[t] = ids


def _render(tokenizer, fmt: str, intro: str, question: str, answer_prefix: str,
            completion_tail: Optional[str]) -> Tuple[List[int], List[int]]:
    """(prefix ids, tail ids) around the context.

    chat: one user turn "intro<context>\\n\\nquestion" in the tokenizer's chat
    template with the generation prompt, then ``answer_prefix`` opening the
    assistant turn. completion: BOS (when the tokenizer has one) + intro, and
    "\\n\\nquestion answer_prefix" (or ``completion_tail``)."""
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("fmt='chat' needs a tokenizer with a chat template; "
                             "use fmt='completion' for a base model")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": intro + _PLACEHOLDER + "\n\n" + question}],
            tokenize=False, add_generation_prompt=True)
        if not isinstance(rendered, str) or rendered.count(_PLACEHOLDER) != 1:
            raise ValueError("the chat template did not render the user turn verbatim")
        head, tail = rendered.split(_PLACEHOLDER)
        head_ids, tail_ids = _encode(tokenizer, [head, tail + answer_prefix])
        return head_ids, tail_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if completion_tail is None:
        completion_tail = "\n\n" + question + (" " + answer_prefix if answer_prefix else "")
    head_ids, tail_ids = _encode(tokenizer, [intro or " ", completion_tail])
    if not intro:
        head_ids = []
    return ([bos] if bos is not None else []) + head_ids, tail_ids


def _sentence_pieces(text: str) -> List[str]:
    """The text cut after each sentence end; every piece keeps the whitespace
    before it (the first one gets a space), so joining them gives the text."""
    pieces = [m.group(0) for m in _SENTENCE.finditer(text.lstrip())]
    if pieces and not pieces[0][:1].isspace():
        pieces[0] = " " + pieces[0]
    return pieces


def _essay_pieces(tokenizer, essay_text: Optional[str], room: int,
                  cache: Dict[str, List[int]]) -> List[str]:
    """Sentence pieces of the essay text (or of the generated prose when it is
    None) worth at least ``room`` tokens, or all of them; their ids land in
    ``cache``."""
    n_chars = 5 * room + 4096
    while True:
        if essay_text is None:
            text, exhausted = haystack_text(None, n_chars), False
        else:
            exhausted = n_chars >= len(essay_text)
            text = essay_text if exhausted else essay_text[:n_chars]
        pieces = _sentence_pieces(text)
        if not exhausted and pieces:
            pieces = pieces[:-1]          # the last one may be cut short
        _encode_unique(tokenizer, pieces, cache)
        if exhausted or sum(len(cache[p]) for p in pieces) >= room:
            return pieces
        n_chars *= 2


def _filler(tokenizer, kind: str, essay_text: Optional[str], room: int
            ) -> Tuple[List[int], List[int]]:
    """(ids, sentence boundaries) of a haystack of at most ``room`` tokens,
    cut at a sentence end. Boundaries are token offsets: 0, the end of each
    sentence. A haystack shorter than ``room`` repeats from its start."""
    cache: Dict[str, List[int]] = {}
    if kind == "noise":
        pieces = [" " + s for s in NOISE_SENTENCES]
        _encode_unique(tokenizer, pieces, cache)
    else:
        pieces = _essay_pieces(tokenizer, essay_text, room, cache)
        if not pieces:
            raise ValueError("essay_text holds no sentences (text ending in . ! or ?)")
    ids: List[int] = []
    bounds = [0]
    i = 0
    while True:
        piece = cache[pieces[i % len(pieces)]]
        if not piece or len(ids) + len(piece) > room:
            break
        ids.extend(piece)
        bounds.append(len(ids))
        i += 1
    return ids, bounds


def _canonical_tokens(tokenizer, texts: Sequence[str]) -> int:
    """Generation tokens that cover the longest of the given right answers."""
    return max(len(ids) for ids in _encode(tokenizer, list(texts))) + _SLACK


# ------------------------------------------------------------------ task plans

@dataclass
class _Plan:
    """What a task puts in a prompt, before tokenizing."""
    intro: str
    question: str
    answer_prefix: str
    answers: List[str]
    scoring: str
    needles: List[List[str]]           # each needle: texts tokenized one by one, concatenated
    depths: List[float]
    haystack: str
    answer_texts: List[str]            # right answers as a model would write them
    completion_tail: Optional[str] = None
    continuation: Optional[str] = None  # scored by loss; equals part ``copied_part`` of needle 0
    copied_part: Optional[int] = None
    max_new_tokens: Optional[int] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    chat_answer_prefix: Optional[str] = None  # where a chat model answers better without one


def _spread(depth: float, n: int) -> List[float]:
    """n depths: ``depth`` first, the others evenly spaced after it, wrapping past 1."""
    return [depth] + [(depth + k / n) % 1.0 for k in range(1, n)]


def _distinct_ints(rng: np.random.Generator, n: int, lo: int, hi: int) -> List[int]:
    """n different integers drawn uniformly from [lo, hi)."""
    out: List[int] = []
    while len(out) < n:
        v = int(rng.integers(lo, hi))
        if v not in out:
            out.append(v)
    return out


def _keys(rng: np.random.Generator, n: int) -> List[str]:
    """n different "adjective-noun" keys."""
    out: List[str] = []
    while len(out) < n:
        k = (f"{_ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]}-"
             f"{_NOUNS[int(rng.integers(len(_NOUNS)))]}")
        if k not in out:
            out.append(k)
    return out


def _magic(key: str, value: int) -> str:
    """A RULER needle: one magic number for a key."""
    return f"One of the special magic numbers for {key} is: {value}."


def _niah_question(key: str) -> Tuple[str, str]:
    """(question, answer prefix) asking for the magic number of a key."""
    return (f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is")


def _plan_passkey(rng, depth, haystack):
    key = int(rng.integers(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    # SmolLM2-Instruct answers "The pass key is" with a definition of a pass key;
    # asked for the number only, in its own words, it gives the number
    return _Plan(_INTRO_PASSKEY, "What is the pass key? Answer with the number only.",
                 "The pass key is", [str(key)], "all",
                 [[" " + needle]], [depth], "noise", [f" {key}."],
                 meta={"key": str(key), "needles": [needle]}, chat_answer_prefix="")


def _plan_niah_single(rng, depth, haystack):
    key = _keys(rng, 1)[0]
    value = _distinct_ints(rng, 1, 1_000_000, 10_000_000)[0]
    q, a = _niah_question(key)
    needle = _magic(key, value)
    return _Plan(_INTRO_NIAH, q, a, [str(value)], "all", [[" " + needle]], [depth], haystack,
                 [f" {value}."], meta={"key": key, "value": str(value), "needles": [needle]})


def _plan_niah_multikey(rng, depth, haystack):
    keys = _keys(rng, _MULTI)
    values = _distinct_ints(rng, _MULTI, 1_000_000, 10_000_000)
    q, a = _niah_question(keys[0])
    needles = [_magic(k, v) for k, v in zip(keys, values)]
    return _Plan(_INTRO_NIAH, q, a, [str(values[0])], "all", [[" " + n] for n in needles],
                 _spread(depth, _MULTI), haystack, [f" {values[0]}."],
                 meta={"key": keys[0], "value": str(values[0]), "distractor_keys": keys[1:],
                       "distractor_values": [str(v) for v in values[1:]], "needles": needles})


def _plan_niah_multivalue(rng, depth, haystack):
    key = _keys(rng, 1)[0]
    values = [str(v) for v in _distinct_ints(rng, _MULTI, 1_000_000, 10_000_000)]
    needles = [_magic(key, v) for v in values]
    q = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    a = f"The special magic numbers for {key} mentioned in the provided text are"
    return _Plan(_INTRO_NIAH, q, a, values, "share", [[" " + n] for n in needles],
                 _spread(depth, _MULTI), haystack, [" " + ", ".join(values) + "."],
                 meta={"key": key, "values": values, "needles": needles})


def _plan_variable_tracking(rng, depth, haystack):
    n = _VT_HOPS + 1
    names: List[str] = []
    while len(names) < n:
        name = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=5))
        if name not in names:
            names.append(name)
    value = int(rng.integers(10000, 100000))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                                 for i in range(1, n)]
    q = f"Find all variables that are assigned the value {value} in the text above."
    a = (f"Answer: According to the chain(s) of variable assignment in the text above, {n} "
         f"variables are assigned the value {value}, they are:")
    return _Plan(_INTRO_VT, q, a, names, "share", [[" " + s] for s in needles],
                 [depth + (1.0 - depth) * i / n for i in range(n)], haystack,
                 [" " + ", ".join(names) + ".", " " + ", ".join("VAR " + v for v in names) + "."],
                 meta={"value": str(value), "names": names, "needles": needles})


def _plan_copy(rng, depth, haystack):
    numbers = ", ".join(str(v) for v in rng.integers(10000, 100000, size=_COPY_NUMBERS))
    return _Plan(_INTRO_COPY, "Repeat the record.", "Record:", [], "loss",
                 [[" Record:", " " + numbers, "."]], [depth], haystack, [],
                 completion_tail="\n\nRepeat the record:", continuation=" " + numbers,
                 copied_part=1, max_new_tokens=0, meta={"record": numbers, "needles": ["Record: " + numbers + "."]})


def _plan_pg_niah(rng, depth, haystack):
    return _Plan(_INTRO_PG, "Question: " + _PG_QUESTION, _PG_ANSWER_PREFIX,
                 ["sandwich", "Dolores Park"], "all", [[" " + _PG_NEEDLE]], [depth], "essay", [],
                 max_new_tokens=24, meta={"rouge_reference": _PG_NEEDLE, "needles": [_PG_NEEDLE]})


_PLANS = {"passkey": _plan_passkey, "niah_single": _plan_niah_single,
          "niah_multikey": _plan_niah_multikey, "niah_multivalue": _plan_niah_multivalue,
          "variable_tracking": _plan_variable_tracking, "copy": _plan_copy,
          "pg_niah": _plan_pg_niah}


# ------------------------------------------------------------------ assembly

class _TooShort(ValueError):
    """A length below what a task needs; ``minimum`` is the shortest that works."""

    def __init__(self, length: int, minimum: int):
        super().__init__(f"length {length} is too short for this task and format: "
                         f"the minimum is {minimum} tokens")
        self.minimum = minimum


def _haystack_sample(task, tokenizer, fmt, length, depth, seed, plan: _Plan,
                     essay_text) -> Sample:
    """A prompt of the plan's needles in a haystack filled up to ``length``."""
    prefix = (plan.chat_answer_prefix if fmt == "chat" and plan.chat_answer_prefix is not None
              else plan.answer_prefix)
    head, tail = _render(tokenizer, fmt, plan.intro, plan.question, prefix,
                         plan.completion_tail)
    flat_texts = [t for needle in plan.needles for t in needle]
    extra = [plan.continuation] if plan.continuation is not None else []
    enc = _encode(tokenizer, flat_texts + extra)
    needles, k = [], 0
    for needle in plan.needles:
        needles.append(enc[k:k + len(needle)])
        k += len(needle)
    continuation = enc[-1] if extra else []
    fixed = len(head) + len(tail) + sum(len(p) for n in needles for p in n) + len(continuation)
    room = length - fixed
    if room < _MIN_FILLER:
        raise _TooShort(length, fixed + _MIN_FILLER)
    hay, bounds = _filler(tokenizer, plan.haystack, essay_text, room)
    n_hay = len(hay)
    # each needle goes to the sentence boundary nearest its depth
    cuts = []
    for d in plan.depths:
        target = d * n_hay
        j = bisect.bisect_left(bounds, target)
        if j == len(bounds) or (j > 0 and target - bounds[j - 1] <= bounds[j] - target):
            j -= 1
        cuts.append(bounds[j])
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    ids = list(head)
    spans: List[Optional[Tuple[int, int]]] = [None] * len(needles)
    record_span = None
    at = 0
    for i in order:
        ids.extend(hay[at:cuts[i]])
        at = cuts[i]
        start = len(ids)
        for p, part in enumerate(needles[i]):
            if i == 0 and p == plan.copied_part:
                record_span = (len(ids), len(ids) + len(part))
            ids.extend(part)
        spans[i] = (start, len(ids))
    ids.extend(hay[at:])
    tail_start = len(ids)
    ids.extend(tail)
    meta = dict(plan.meta)
    question = plan.question
    if fmt == "completion" and plan.completion_tail is not None:
        question, prefix = plan.completion_tail.strip(), ""
    meta.update(fmt=fmt, haystack=plan.haystack, question=question, answer_prefix=prefix,
                haystack_span=(len(head), tail_start),
                haystack_tokens=n_hay, needle_depths=[c / n_hay if n_hay else 0.0 for c in cuts])
    if record_span is not None:
        meta["record_span"] = record_span
    if plan.max_new_tokens is not None:
        max_new = plan.max_new_tokens
    else:
        max_new = _canonical_tokens(tokenizer, plan.answer_texts)
    return Sample(task=task, length=length, depth=depth, seed=seed, prompt_ids=ids,
                  answers=list(plan.answers), scoring=plan.scoring, max_new_tokens=max_new,
                  continuation_ids=list(continuation), needle_spans=list(spans),
                  tail_start=tail_start, meta=meta)


def _common_words_sample(tokenizer, fmt, length, depth, seed) -> Sample:
    """RULER's common-words extraction: a numbered list ("1. word 2. word ...")
    that fills the length, where 10 words appear about ten times as often as
    each of the others; the counts grow with the length."""
    rng = np.random.default_rng(seed)
    words = [_VOCABULARY[int(i)] for i in rng.permutation(len(_VOCABULARY))]
    common, rare = words[:_N_COMMON], words[_N_COMMON:]
    question = f"What are the {_N_COMMON} most common words in the above list?"
    prefix = (f"Answer: The top {_N_COMMON} words that appear most often in the list are:")
    head, tail = _render(tokenizer, fmt, _INTRO_CW, question, prefix, None)
    room = length - len(head) - len(tail)
    word_ids = dict(zip(words, _encode(tokenizer, [" " + w for w in words])))
    wcost = {w: len(ids) for w, ids in word_ids.items()}
    common_cost = sum(wcost[w] for w in common)
    num_ids: List[List[int]] = []
    cum = [0]                                   # cum[n]: tokens of the labels " 1." .. " n."

    def labels(n: int) -> None:
        if n >= len(cum):
            new = _encode(tokenizer, [f" {i}." for i in range(len(cum), max(n, 2 * len(cum)) + 1)])
            for ids in new:
                num_ids.append(ids)
                cum.append(cum[-1] + len(ids))

    def cost(c: int, r: int, k: int, extra: int = 0) -> int:
        """Tokens of a list: common words c times, the first k rare words r times
        (the first ``extra`` of them once more)."""
        n = _N_COMMON * c + r * k + extra
        labels(n)
        return (cum[n] + c * common_cost + r * sum(wcost[w] for w in rare[:k])
                + sum(wcost[w] for w in rare[:extra]))

    r, c = 3, 30
    minimum = length - room + cost(6, r, _CW_RARE_MIN)
    if length < minimum:
        raise _TooShort(length, minimum)
    while c > 6 and cost(c, r, _CW_RARE_MIN) > room:
        c -= 1
    k = _CW_RARE_MIN
    while k < len(rare) and cost(c, r, k + 1) <= room:
        k += 1
    extra = 0
    if k == len(rare) and c == 30:
        while cost(10 * (r + 1), r + 1, k) <= room:
            r += 1
        c = 10 * r
        while extra < k and cost(c, r, k, extra + 1) <= room:
            extra += 1
    counts = {w: c for w in common}
    counts.update({w: r + (1 if i < extra else 0) for i, w in enumerate(rare[:k])})
    seq = [w for w, n in counts.items() for _ in range(n)]
    seq = [seq[int(i)] for i in rng.permutation(len(seq))]
    labels(len(seq))
    ids = list(head)
    for i, w in enumerate(seq):
        ids.extend(num_ids[i])
        ids.extend(word_ids[w])
    tail_start = len(ids)
    ids.extend(tail)
    answer_texts = [" " + ", ".join(common) + ".",
                    " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common))]
    meta = {"fmt": fmt, "haystack": "none", "question": question, "answer_prefix": prefix,
            "haystack_span": (len(head), tail_start), "common": list(common),
            "common_count": c, "rare_count": r, "n_rare": k, "n_items": len(seq),
            "counts": counts}
    return Sample(task="common_words", length=length, depth=depth, seed=seed, prompt_ids=ids,
                  answers=list(common), scoring="share",
                  max_new_tokens=_canonical_tokens(tokenizer, answer_texts), tail_start=tail_start,
                  meta=meta)


def make_sample(task: str, tokenizer, *, fmt: str, length: int, depth: float, seed: int,
                haystack: str = "noise", essay_text: Optional[str] = None) -> Sample:
    """One prompt of ``task`` in ``fmt`` ("chat" or "completion") of at most
    ``length`` tokens (prompt + continuation; at least ~0.9 x length), with
    the (first) needle at ``depth`` (0-1) of the haystack, everything random
    drawn from ``seed``.

    ``haystack`` is "noise" (RULER's repeated sentences) or "essay"
    (``essay_text``, or generated prose when it is None); passkey always uses
    the noise, pg_niah always the essay, common_words none. Raises ValueError
    for an unknown task, fmt or haystack, a depth outside [0, 1], or a length
    too short for the task (the message gives the minimum).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or math.isnan(depth) \
            or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if essay_text is not None and not isinstance(essay_text, str):
        raise ValueError(f"essay_text must be a str or None, got {type(essay_text).__name__}")
    length, seed, depth = int(length), int(seed), float(depth)
    if task == "common_words":
        return _common_words_sample(tokenizer, fmt, length, depth, seed)
    plan = _PLANS[task](np.random.default_rng(seed), depth, haystack)
    return _haystack_sample(task, tokenizer, fmt, length, depth, seed, plan, essay_text)


def minimum_length(task: str, tokenizer, *, fmt: str) -> int:
    """The shortest ``length`` :func:`make_sample` accepts for a task and format."""
    try:
        make_sample(task, tokenizer, fmt=fmt, length=1, depth=0.5, seed=0)
    except _TooShort as e:
        return e.minimum
    return 1
