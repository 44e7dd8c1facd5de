"""How the harness runs a method on a model: prefill, dense tail, decode, causal loss.

One :class:`Runner` patches a model once and switches, call by call,
between exact attention (every layer through dhsa's exact kernel, which is
also the "dense" method) and a method's :class:`~dhsa.DHSAConfig`.

- :meth:`Runner.answer`: the prompt is prefilled with the method (one
  forward over the whole prompt) - or, with ``tail=N``, the prompt minus
  its last N tokens is prefilled with the method and those N tokens (the
  question) attend exactly over the cache, as the authors' code does - and
  the answer is decoded greedily with exact decode steps.
- :meth:`Runner.causal_nll`: the prefix is prefilled with the method, then
  every token of the continuation is scored seeing only its past:
  ``continuation="exact"`` feeds them through exact attention over the
  cache (what exact decode steps compute, in one call); ``"sparse"`` feeds
  them through the method with one selection per query (``block_size=1``),
  which is what a sparse decode step would see. A query block's mean query
  never mixes a scored token with a later one, so no loss depends on a later
  token (``tests/test_protocol.py`` changes future tokens to check it).
- Sparse decode (``decode_budget=N``): the method's prefill fills each
  layer's :class:`dhsa.KVCache` and every one-token step after it reads N
  keys of it (:func:`dhsa.decode_attention`); for "dense" the prefill is
  exact. ``answer(step_tail=n)`` feeds the last n prompt tokens (the
  question) through decode steps one at a time, as Quest evaluates;
  ``causal_nll(continuation="decode")`` scores every continuation token
  through a decode step.
- :meth:`Runner.leaky_nll`: one forward over everything, every position
  scored: block selection then lets token t+1's query shape what position
  t sees. Kept only as a labelled comparison.

Equal density: :func:`matched_config` gives a method the density-mode
config whose *achieved* density (selected / causally allowed pairs, the
quantity the patch records) equals a target at a given length, with sink
and local scaled down where the forced keys alone would exceed the target.
"""
from __future__ import annotations

import inspect
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import DHSAConfig
from ..rules import block_geometry, budget_clamp, forced_ranges, in_dense_tail

__all__ = ["Runner", "VARIANTS", "EXACT_PREFILL", "achieved_density", "forced_keys",
           "matched_config", "per_query_config", "with_decode"]

#: a config whose prefill runs exact (every key fits its budget) but, given a
#: decode_budget, fills the layers' KV caches: "dense" under sparse decode
EXACT_PREFILL = DHSAConfig(budget=2**31 - 1)


def with_decode(cfg: Optional[DHSAConfig], decode_budget: int,
                decode_reuse: int = 1, decode_score: str = "mean") -> DHSAConfig:
    """The method's config (exact prefill for None) with sparse decode (its
    chunk scores serving ``decode_reuse`` steps, chunks scored by
    ``decode_score``)."""
    return (EXACT_PREFILL if cfg is None else cfg).replace(decode_budget=int(decode_budget),
                                                          decode_reuse=int(decode_reuse),
                                                          decode_score=decode_score)

#: methods whose selection of a one-query block depends on that query and its past only
PER_QUERY_CAUSAL = ("dhsa", "block_topk", "streaming", "oracle")


# ---- equal density -------------------------------------------------------------

def forced_keys(target: float, length: int, block_size: int = 64) -> Tuple[int, int]:
    """(sink, local) for a target density at a length: DHSAConfig's 64 / 256
    where the budget is large, scaled down so that sink + local + block stay
    within about half of a block's average budget (target x length / 2)."""
    avg = target * length / 2.0
    room = max(0.0, avg / 2.0 - block_size)
    local = int(min(256, max(32, 0.8 * room)))
    sink = int(min(64, max(16, 0.2 * room)))
    return sink, local


def achieved_density(cfg: DHSAConfig, length: int) -> float:
    """Selected / causally allowed query-key pairs of one head of a causal
    prefill of ``length`` tokens when every sparse block fills its budget
    (dhsa, block_topk, streaming and vertical_slash all do): the rules of
    :mod:`dhsa.rules`, counted in closed form per query block."""
    L, bs = int(length), cfg.block_size
    sel = tot = 0
    for qb in range((L + bs - 1) // bs):
        g = block_geometry(L, L, bs, qb)
        allowed = g.hi - g.lo
        pairs = sum(range(g.spos + 1, g.epos + 2))  # query p sees p + 1 keys
        tot += pairs
        _, _, _, forced = forced_ranges(g, cfg.sink, cfg.local)
        lo, _ = budget_clamp(allowed, forced, mode=cfg.budget_mode, budget=cfg.budget,
                             density=cfg.density, min_budget=cfg.min_budget,
                             max_budget=cfg.max_budget)
        if allowed <= lo or in_dense_tail(g, L, cfg.dense_tail):
            sel += pairs
        else:  # keys before the block: seen by all its queries; its own: a triangle
            sel += g.nq * (lo - g.nq) + g.nq * (g.nq + 1) // 2
    return sel / tot if tot else 1.0


# Harness names of DHSA selections that change fields of a method rather than
# the method itself (the levers' rows): name -> (method, changed fields).
VARIANTS = {
    # the key-level second look (chunk_score="max") on chunks of 2 to 4 keys
    "dhsa_max": ("dhsa", dict(chunk_score="max", min_chunk=2, max_chunk=4)),
}


def matched_config(method: str, target: float, length: int,
                   base: Optional[DHSAConfig] = None) -> Optional[DHSAConfig]:
    """The density-mode DHSAConfig of ``method`` (a DHSAConfig method or one
    of :data:`VARIANTS`) whose achieved density at ``length`` is ``target``
    (None for dense). Raises ValueError when the target cannot be reached at
    that length."""
    if method == "dense":
        return None
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target density must be in (0, 1], got {target}")
    base = base or DHSAConfig()
    if method in VARIANTS:
        method, changes = VARIANTS[method]
        base = base.replace(**changes)
    sink, local = forced_keys(target, length, base.block_size)
    local = max(local, base.lookahead)
    cfg = base.replace(method=method, budget_mode="density", sink=sink, local=local,
                       density=target)
    floor = achieved_density(cfg.replace(density=1e-9), length)
    if floor > target * 1.02:
        raise ValueError(f"density {target} cannot be reached at {length} tokens: the forced "
                         f"keys alone give {floor:.3f}")
    lo, hi = 1e-9, 1.0
    for _ in range(40):  # bisection on the density knob: achieved density is monotone in it
        mid = 0.5 * (lo + hi)
        if achieved_density(cfg.replace(density=mid), length) < target:
            lo = mid
        else:
            hi = mid
    return cfg.replace(density=hi)


def per_query_config(cfg: DHSAConfig) -> DHSAConfig:
    """The config scoring a continuation with one selection per query."""
    if cfg.method not in PER_QUERY_CAUSAL:
        raise ValueError(f"method {cfg.method!r} is not causal with one selection per query "
                         f"(it picks keys from the last queries of the call); "
                         f"use continuation='exact'")
    return cfg.replace(block_size=1)


# ---- the runner ----------------------------------------------------------------

def _num_layers(model) -> int:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.num_hidden_layers)


def _nll_of(logits, targets) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64; logits (n, V)."""
    import torch
    lp = torch.log_softmax(logits.float(), dim=-1)
    return (-lp.gather(1, targets.view(-1, 1)).squeeze(1)).double().numpy()


class Runner:
    """A model patched once; each call says which attention it runs.

    ``num_threads``: threads of the C core (default: all cores);
    ``dense_layers``: layers kept exact under every method.
    """

    def __init__(self, model, tokenizer=None, *, num_threads: Optional[int] = None,
                 dense_layers: Sequence[int] = ()) -> None:
        from .. import patching
        self.model = model
        self.tokenizer = tokenizer
        self.num_threads = num_threads
        self.method_dense_layers = tuple(dense_layers)
        self.layers = range(_num_layers(model))
        self.handle = patching.patch(model, DHSAConfig(), dense_layers=self.layers,
                                     num_threads=num_threads)
        # transformers 5 names the cache argument `cache`, earlier versions `past_key_values`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def close(self) -> None:
        from .. import patching
        patching.unpatch(self.model)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- which attention runs -------------------------------------------------------
    def _exact(self) -> None:
        self.handle.configure(DHSAConfig(), dense_layers=self.layers, num_threads=self.num_threads)
        self.handle.reset()  # exact calls are not measured: keep no records of them

    def _method(self, cfg: DHSAConfig) -> None:
        self.handle.configure(cfg, dense_layers=self.method_dense_layers,
                              num_threads=self.num_threads)
        self.handle.reset()

    def _sparse_layers(self) -> List[int]:
        """Layers that ran the sparse path since the method was set."""
        return sorted({r.layer for r in self.handle.stats if r.path == "sparse"
                       and r.layer is not None})

    def _decode_density(self) -> Optional[float]:
        """Mean density of the sparse decode steps since the method was set."""
        d = [r.density for r in self.handle.stats if r.reason == "sparse decode"]
        return float(np.mean(d)) if d else None

    def _density(self) -> Optional[float]:
        """Mean density of the sparse-path calls since the method was set; None
        when none ran sparse (every layer dense or exact)."""
        d = self.handle.mean_density(include_dense=False)
        return None if d is None else float(d)

    def _forward(self, ids: Sequence[int], past=None, all_logits: bool = False):
        """(cache, logits (n, V)) of one forward over ids after the cache ``past``."""
        import torch
        x = torch.tensor([list(ids)], dtype=torch.long)
        kw = {self._cache_arg: past} if past is not None else {}
        with torch.no_grad():
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=0 if all_logits else 1,
                             **kw)
        cache = getattr(out, "cache", None)
        return (cache if cache is not None else out.past_key_values), out.logits[0]

    # -- retrieval -----------------------------------------------------------------
    def answer(self, prompt_ids: Sequence[int], cfg: Optional[DHSAConfig], *,
               max_new_tokens: int, tail: int = 0, eos_token_id=None,
               decode_budget: Optional[int] = None, step_tail: int = 0,
               decode_reuse: int = 1, decode_score: str = "mean") -> Dict:
        """Greedy answer to a prompt: {tokens, text (if a tokenizer was given),
        density (of the method's prefill over the layers that ran sparse; 1.0
        for exact attention, None if no layer ran sparse), sparse_layers (those
        layers), prefill_seconds, seconds}. ``cfg`` None is exact attention; ``tail`` > 0 prefills the
        last ``tail`` prompt tokens exactly. ``decode_budget``: the answer (and
        the last ``step_tail`` prompt tokens, one step each) through sparse
        decode; the result then holds ``decode_density``. ``decode_reuse``,
        ``decode_score``: DHSAConfig's fields of those steps."""
        t0 = time.perf_counter()
        ids = list(prompt_ids)
        if tail < 0 or step_tail < 0:
            raise ValueError(f"tail and step_tail must be >= 0, got {tail}, {step_tail}")
        if decode_budget is not None:
            return self._answer_decoding(ids, with_decode(cfg, decode_budget, decode_reuse,
                                                          decode_score),
                                         max_new_tokens=max_new_tokens, tail=tail,
                                         step_tail=step_tail, eos_token_id=eos_token_id, t0=t0,
                                         exact_prefill=cfg is None)
        if step_tail:
            raise ValueError("step_tail feeds the question through sparse decode steps: it "
                             "needs a decode_budget")
        density: Optional[float] = 1.0
        sparse_layers: List[int] = []
        if cfg is None:
            self._exact()
            past, logits = self._forward(ids)
        elif tail <= 0:
            self._method(cfg)
            past, logits = self._forward(ids)
            density, sparse_layers = self._density(), self._sparse_layers()
        else:
            if tail >= len(ids):
                raise ValueError(f"tail ({tail}) must be shorter than the prompt ({len(ids)})")
            self._method(cfg)
            past, _ = self._forward(ids[:-tail])
            density, sparse_layers = self._density(), self._sparse_layers()
            self._exact()
            past, logits = self._forward(ids[-tail:], past)
        self._exact()
        t1 = time.perf_counter()
        toks = self._greedy(past, logits, max_new_tokens, eos_token_id)
        return self._answered(toks, density=density, sparse_layers=sparse_layers,
                              prefill_seconds=t1 - t0, seconds=time.perf_counter() - t0)

    def _answer_decoding(self, ids: List[int], dcfg: DHSAConfig, *, max_new_tokens, tail,
                         step_tail, eos_token_id, t0, exact_prefill) -> Dict:
        """answer() under sparse decode: prefill, question steps, answer steps."""
        if tail:
            raise ValueError("a dense tail and sparse decode do not combine: give one of them")
        if step_tail >= len(ids):
            raise ValueError(f"step_tail ({step_tail}) must be shorter than the prompt "
                             f"({len(ids)})")
        self.handle.decode_states.clear()
        self._method(dcfg)
        past, logits = self._forward(ids[:len(ids) - step_tail])
        density = 1.0 if exact_prefill else self._density()
        sparse_layers = self._sparse_layers()
        t1 = time.perf_counter()
        self.handle.reset()  # from here on: decode steps only
        for t in ids[len(ids) - step_tail:]:
            past, logits = self._forward([t], past)
        toks = self._greedy(past, logits, max_new_tokens, eos_token_id)
        out = self._answered(toks, density=density, sparse_layers=sparse_layers,
                             prefill_seconds=t1 - t0, seconds=time.perf_counter() - t0)
        out["decode_density"] = self._decode_density()
        out["decode_rebuilds"] = self.handle.decode_states.rebuilds
        self._exact()
        return out

    def _greedy(self, past, logits, max_new_tokens: int, eos_token_id) -> List[int]:
        """Greedy tokens from the logits after the prompt, with the attention set now."""
        if eos_token_id is None:
            eos_token_id = getattr(self.model.config, "eos_token_id", None)
        stop = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                   [] if eos_token_id is None else [eos_token_id])
        toks: List[int] = []
        for i in range(max_new_tokens):
            t = int(logits[-1].argmax())
            toks.append(t)
            if t in stop or i == max_new_tokens - 1:
                break
            past, logits = self._forward([t], past)
        return toks

    def _answered(self, toks: List[int], **fields) -> Dict:
        out = {"tokens": toks, **fields}
        if self.tokenizer is not None:
            out["text"] = " ".join(self.tokenizer.decode(toks, skip_special_tokens=True).split())
        return out

    # -- losses --------------------------------------------------------------------
    def causal_nll(self, prefix_ids: Sequence[int], continuation_ids: Sequence[int],
                   cfg: Optional[DHSAConfig], *, continuation: str = "exact",
                   decode_budget: Optional[int] = None, decode_reuse: int = 1,
                   decode_score: str = "mean") -> Dict:
        """Per-token loss of ``continuation_ids`` after ``prefix_ids``, each
        token seeing only its past: {nll (array, one per continuation token),
        density (of the prefix prefill; None if no layer ran sparse), seconds,
        and for ``continuation="sparse"`` the continuation_density}.
        ``continuation``: "exact" or "sparse" (the method, one selection per
        query), or "decode": one sparse decode step per token with
        ``decode_budget`` keys (the result holds its ``decode_density``), the
        chunk scores of a step serving ``decode_reuse`` steps, chunks scored
        by ``decode_score``."""
        if continuation not in ("exact", "sparse", "decode"):
            raise ValueError(f"continuation must be 'exact', 'sparse' or 'decode', got "
                             f"{continuation!r}")
        if (continuation == "decode") != (decode_budget is not None):
            raise ValueError("continuation='decode' and decode_budget go together")
        cont, prefix_ids = list(continuation_ids), list(prefix_ids)
        if not cont or not prefix_ids:
            raise ValueError("causal_nll needs a non-empty prefix and continuation")
        if continuation == "decode":
            return self._nll_decoding(prefix_ids, cont,
                                      with_decode(cfg, decode_budget, decode_reuse,
                                                  decode_score),
                                      exact_prefill=cfg is None)
        per_query = (per_query_config(cfg) if cfg is not None and continuation == "sparse"
                     else None)
        import torch
        t0 = time.perf_counter()
        density = 1.0
        if cfg is None:
            self._exact()
        else:
            self._method(cfg)
        past, logits = self._forward(prefix_ids)
        if cfg is not None:
            density = self._density()
        first = logits[-1:]
        out = {}
        if len(cont) > 1:
            if per_query is None:
                self._exact()
            else:
                self._method(per_query)
            _, rest = self._forward(cont[:-1], past, all_logits=True)
            if per_query is not None:
                out["continuation_density"] = self._density()
            first = torch.cat([first, rest], dim=0)
        self._exact()
        nll = _nll_of(first, torch.tensor(cont, dtype=torch.long))
        return {"nll": nll, "density": density, "seconds": time.perf_counter() - t0, **out}

    def _nll_decoding(self, prefix_ids: List[int], cont: List[int], dcfg: DHSAConfig, *,
                      exact_prefill: bool) -> Dict:
        """causal_nll() with every continuation token through a sparse decode step."""
        import torch
        t0 = time.perf_counter()
        self.handle.decode_states.clear()
        self._method(dcfg)
        past, logits = self._forward(prefix_ids)
        density = 1.0 if exact_prefill else self._density()
        self.handle.reset()
        rows = [logits[-1:]]
        for t in cont[:-1]:
            past, logits = self._forward([t], past)
            rows.append(logits[-1:])
        out = {"decode_density": self._decode_density(),
               "decode_rebuilds": self.handle.decode_states.rebuilds}
        self._exact()
        nll = _nll_of(torch.cat(rows, dim=0), torch.tensor(cont, dtype=torch.long))
        return {"nll": nll, "density": density, "seconds": time.perf_counter() - t0, **out}

    def leaky_nll(self, ids: Sequence[int], cfg: Optional[DHSAConfig]) -> Dict:
        """Per-token loss of ids[1:] from ONE forward over ids with the method:
        not causal under block selection (labelled leaky wherever reported)."""
        import torch
        t0 = time.perf_counter()
        if cfg is None:
            self._exact()
        else:
            self._method(cfg)
        _, logits = self._forward(ids, all_logits=True)
        density = 1.0 if cfg is None else self._density()
        self._exact()
        nll = _nll_of(logits[:-1], torch.tensor(list(ids)[1:], dtype=torch.long))
        return {"nll": nll, "density": density, "seconds": time.perf_counter() - t0}
