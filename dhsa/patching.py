"""Hugging Face ``transformers`` integration: DHSA as an attention implementation.

Importing this module registers ``"dhsa"`` with ``transformers.AttentionInterface``
(the attention function) and ``transformers.masking_utils.AttentionMaskInterface``
(boolean masks, ``None`` when a plain causal pattern needs none, as for
``sdpa``). Then either::

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="dhsa")
    # or, on a loaded model:
    handle = dhsa.patch(model, dhsa.DHSAConfig(budget=1024), dense_layers=range(2))
    model.generate(...)
    print(handle.format_summary())     # per layer: calls, paths, mean density, times
    handle.verify()                    # RuntimeError if some attention layer bypassed DHSA
    dhsa.unpatch(model)                # the previous implementation, exactly

What each call does (``dhsa_attention_forward``):

- ``Lq == 1`` (decoding): exact ``dhsa.dense_attention`` (path ``"decode"``);
- layers listed in ``dense_layers``, or whose keys all fit the budget
  (``budget_mode="tokens"`` and ``min(Lk, sliding_window) <= budget``): exact
  ``dhsa.dense_attention`` (path ``"dense"``);
- otherwise ``dhsa.sparse_attention`` (path ``"sparse"``).

GQA runs natively (K/V are never repeated). ``scaling`` (Gemma's
``query_pre_attn_scalar``), ``softcap`` (Gemma-2 logit capping) and
``sliding_window`` arrive as keyword arguments from the model and are passed
to the core. float32 and float16 tensors reach the core without a copy on the
PyTorch side (the core makes a contiguous copy of a strided query; float16
K/V stay float16 inside the kernels); bfloat16 is converted to float32 at
the boundary and back.

Padding. The attention mask (4-D, boolean or additive float) is analysed per
batch item: the item's real keys must form one contiguous span and its real
queries the last rows of that span, with exactly the causal (and
sliding-window) pattern on top - what left padding, right padding, caches
and ``generate()`` produce. Each item then runs on its own unpadded span, so
padded keys are never selected and real tokens get the same output as an
unpadded run. Padding queries get zeros. Masks of any other shape (packed
sequences, bidirectional image blocks, custom 4-D masks) run through an exact
masked attention in PyTorch (path ``"fallback"``), recorded in the stats -
never silently.

DHSA is an inference method: training-mode dropout raises, and outputs carry
no gradient (a warning says so once if gradients were requested).
"""
from __future__ import annotations

import math
import threading
import time
import warnings
import weakref
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("dhsa.patching needs PyTorch (pip install torch==2.13.0)") from exc
try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError('dhsa.patching needs transformers (pip install "transformers>=4.48")') from exc
try:  # transformers >= 4.50
    from transformers import AttentionInterface
except ImportError:  # pragma: no cover - older transformers: a plain dict
    AttentionInterface = None
try:  # transformers >= 4.53: masks built per attention implementation
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover - older models build 4-D float masks themselves
    AttentionMaskInterface = sdpa_mask = None

from .api import Selection, dense_attention, sparse_attention
from .config import DHSAConfig

__all__ = [
    "IMPLEMENTATION",
    "CallRecord",
    "PatchHandle",
    "default_handle",
    "dhsa_attention_forward",
    "get_handle",
    "patch",
    "register",
    "unpatch",
]

IMPLEMENTATION = "dhsa"
PATHS = ("sparse", "dense", "decode", "fallback")

# attention module -> (handle, module name); weak so that a dropped model frees its modules
_BINDINGS: "weakref.WeakKeyDictionary[nn.Module, Tuple[PatchHandle, str]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_DEFAULT_HANDLE: Optional["PatchHandle"] = None
_HANDLE_ATTR = "_dhsa_handle"


def register() -> None:
    """Register ``"dhsa"`` with transformers' attention and mask interfaces (idempotent).

    Done on import of this module; call again if something reset the registries.
    """
    if AttentionInterface is not None:
        AttentionInterface.register(IMPLEMENTATION, dhsa_attention_forward)
    else:  # pragma: no cover - transformers < 4.50
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS[IMPLEMENTATION] = dhsa_attention_forward
    # Boolean 4-D masks (None for a plain causal pattern), exactly as for sdpa. Without a
    # mask function, transformers would hand the attention no mask at all and padding
    # would be lost.
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _get_impl(cfg):
    return getattr(cfg, "_attn_implementation_internal", cfg._attn_implementation)


def _set_impl(cfg, value) -> None:
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = value
    else:  # pragma: no cover - very old configs
        cfg._attn_implementation = value


# --------------------------------------------------------------------------------------
# per-call statistics
# --------------------------------------------------------------------------------------

@dataclass
class CallRecord:
    """One call of the attention function (one layer, one forward).

    ``density``: selected / causally allowed query-key pairs (1.0 for dense
    paths), weighted over batch items. Times in seconds: ``predict_seconds``
    (chunking + selection), ``attention_seconds`` (the kernels),
    ``total_seconds`` (the whole call, conversions and mask analysis included).
    ``reason`` says why a dense path was taken.
    """

    layer: Optional[int]
    module: str
    path: str
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    density: float
    predict_seconds: float
    attention_seconds: float
    total_seconds: float
    window: Optional[int] = None
    softcap: Optional[float] = None
    padded: bool = False
    reason: str = ""
    selection: Optional[Selection] = None

    @property
    def key(self):
        return self.layer if self.layer is not None else self.module


class PatchHandle:
    """What ``dhsa.patch`` did to a model, and what DHSA did since.

    Attributes: ``config`` (the DHSAConfig of every layer not overridden),
    ``dense_layers``, ``layer_configs`` (overrides keyed by ``layer_idx`` or
    module name), ``dense_when_fits``, ``num_threads``, ``keep_selections``
    (layers whose Selection objects are kept in the records), ``stats``
    (list of :class:`CallRecord`), ``calls`` (module name -> number of calls),
    ``modules`` (module name -> attention module that should call DHSA).
    """

    def __init__(self, model: Optional[nn.Module], config: DHSAConfig, *,
                 dense_layers: Iterable = (), layer_configs: Optional[Mapping] = None,
                 dense_when_fits: bool = True, num_threads: Optional[int] = None,
                 keep_selections: Iterable = (), record: bool = True) -> None:
        self.model = model
        self.modules: "OrderedDict[str, nn.Module]" = OrderedDict()
        self._previous: List[Tuple[Any, Any]] = []
        self.active = False
        self.stats: List[CallRecord] = []
        self.calls: Dict[str, int] = defaultdict(int)
        self.configure(config, dense_layers=dense_layers, layer_configs=layer_configs,
                       dense_when_fits=dense_when_fits, num_threads=num_threads,
                       keep_selections=keep_selections, record=record)

    # -- configuration ----------------------------------------------------------------
    def configure(self, config: Optional[DHSAConfig] = None, *, dense_layers: Iterable = (),
                  layer_configs: Optional[Mapping] = None, dense_when_fits: bool = True,
                  num_threads: Optional[int] = None, keep_selections: Iterable = (),
                  record: bool = True) -> None:
        config = DHSAConfig() if config is None else config
        if not isinstance(config, DHSAConfig):
            raise TypeError(f"config must be a dhsa.DHSAConfig or None, got {type(config).__name__}")
        overrides = dict(layer_configs or {})
        for key, cfg in overrides.items():
            if not isinstance(cfg, DHSAConfig):
                raise TypeError(f"layer_configs[{key!r}] must be a dhsa.DHSAConfig, "
                                f"got {type(cfg).__name__}")
            _check_layer_key(key, "layer_configs")
        dense = frozenset(dense_layers)
        for key in dense:
            _check_layer_key(key, "dense_layers")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        self.config = config
        self.dense_layers = dense
        self.layer_configs = overrides
        self.dense_when_fits = bool(dense_when_fits)
        self.num_threads = num_threads
        self.keep_selections = frozenset(keep_selections)
        self.record = bool(record)

    def config_for(self, layer: Optional[int], name: str) -> Tuple[DHSAConfig, bool]:
        """(DHSAConfig, forced dense?) of one attention module."""
        forced = (layer is not None and layer in self.dense_layers) or name in self.dense_layers
        if layer is not None and layer in self.layer_configs:
            return self.layer_configs[layer], forced
        if name in self.layer_configs:
            return self.layer_configs[name], forced
        return self.config, forced

    # -- statistics -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the recorded calls (stats and call counts)."""
        self.stats.clear()
        self.calls.clear()

    def _add(self, rec: CallRecord) -> None:
        self.calls[rec.module] += 1
        if self.record:
            self.stats.append(rec)

    def calls_per_layer(self) -> Dict[Any, int]:
        """layer_idx (or module name) -> number of attention calls since patch/reset."""
        out: Dict[Any, int] = {}
        for name, n in self.calls.items():
            mod = self.modules.get(name)
            layer = getattr(mod, "layer_idx", None) if mod is not None else None
            key = layer if layer is not None else name
            out[key] = out.get(key, 0) + n
        return out

    def summary(self) -> Dict[Any, Dict[str, Any]]:
        """Per layer (layer_idx or module name): ``calls``, calls per path,
        ``mean_density`` over prefill calls (sparse and dense; None if only
        decode calls), ``mean_sparse_density`` over sparse calls, summed
        ``predict_seconds`` / ``attention_seconds`` / ``total_seconds``."""
        out: Dict[Any, Dict[str, Any]] = {}
        for rec in self.stats:
            s = out.setdefault(rec.key, {"calls": 0, **{p: 0 for p in PATHS},
                                         "_d": [], "_sd": [], "predict_seconds": 0.0,
                                         "attention_seconds": 0.0, "total_seconds": 0.0})
            s["calls"] += 1
            s[rec.path] += 1
            if rec.path != "decode":
                s["_d"].append(rec.density)
            if rec.path == "sparse":
                s["_sd"].append(rec.density)
            s["predict_seconds"] += rec.predict_seconds
            s["attention_seconds"] += rec.attention_seconds
            s["total_seconds"] += rec.total_seconds
        for s in out.values():
            d, sd = s.pop("_d"), s.pop("_sd")
            s["mean_density"] = float(np.mean(d)) if d else None
            s["mean_sparse_density"] = float(np.mean(sd)) if sd else None
        return out

    def mean_density(self, include_dense: bool = True) -> Optional[float]:
        """Mean density over the recorded prefill calls (sparse only if not include_dense)."""
        d = [r.density for r in self.stats
             if r.path == "sparse" or (include_dense and r.path in ("dense", "fallback"))]
        return float(np.mean(d)) if d else None

    def format_summary(self) -> str:
        """The summary as a text table."""
        summ = self.summary()
        lines = [f"{'layer':>8} {'calls':>5} {'sparse':>6} {'dense':>5} {'decode':>6} "
                 f"{'fallbk':>6} {'density':>8} {'predict_s':>9} {'attn_s':>8}"]
        for key, s in summ.items():
            dens = "-" if s["mean_density"] is None else f"{s['mean_density']:.3f}"
            lines.append(f"{str(key):>8} {s['calls']:>5} {s['sparse']:>6} {s['dense']:>5} "
                         f"{s['decode']:>6} {s['fallback']:>6} {dens:>8} "
                         f"{s['predict_seconds']:>9.4f} {s['attention_seconds']:>8.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PatchHandle(active={self.active}, modules={len(self.modules)}, "
                f"calls={sum(self.calls.values())}, config={self.config})")

    # -- checks -----------------------------------------------------------------------
    def verify(self, modules: Optional[Iterable[str]] = None) -> Dict[Any, int]:
        """Check that every attention module (or those named) ran through DHSA
        since patch()/reset(); returns calls per layer. Raises RuntimeError
        naming the modules that never called it (they bypass AttentionInterface,
        or the model's attention implementation was switched away)."""
        names = list(self.modules) if modules is None else list(modules)
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise KeyError(f"not attention modules of this patch: {unknown}")
        missing = [n for n in names if self.calls.get(n, 0) == 0]
        if missing:
            impls = sorted({str(c._attn_implementation) for c, _ in self._previous}) if self.model is not None else []
            hint = ("no call at all reached DHSA: run a forward pass first" if not self.calls
                    else "those modules did not call the attention interface")
            raise RuntimeError(
                f"DHSA verification failed: {len(missing)} of {len(names)} attention modules never "
                f"called the 'dhsa' attention function ({hint}; current implementation(s): "
                f"{impls}). Modules: {missing[:8]}{' ...' if len(missing) > 8 else ''}. A model whose "
                "attention modules compute attention themselves instead of going through "
                "transformers.AttentionInterface cannot be patched.")
        return self.calls_per_layer()

    # -- undo -------------------------------------------------------------------------
    def unpatch(self) -> bool:
        """Restore the attention implementation(s) saved by patch(); True if it did anything."""
        if not self.active:
            return False
        for cfg, value in self._previous:
            _set_impl(cfg, value)
        with _LOCK:
            for mod in self.modules.values():
                b = _BINDINGS.get(mod)
                if b is not None and b[0] is self:
                    del _BINDINGS[mod]
        if self.model is not None and getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.active = False
        return True

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def _check_layer_key(key, what: str) -> None:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"{what} keys must be layer indices (int) or module names (str), got {key!r}")


def default_handle() -> PatchHandle:
    """The handle (default DHSAConfig, stats) of attention modules reached
    without dhsa.patch(), e.g. after ``from_pretrained(..., attn_implementation="dhsa")``."""
    global _DEFAULT_HANDLE
    with _LOCK:
        if _DEFAULT_HANDLE is None:
            _DEFAULT_HANDLE = PatchHandle(None, DHSAConfig())
            _DEFAULT_HANDLE.active = True
        return _DEFAULT_HANDLE


def get_handle(model: nn.Module) -> Optional[PatchHandle]:
    """The PatchHandle of a patched model, or None."""
    return getattr(model, _HANDLE_ATTR, None)


# --------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------

def _all_configs(model: nn.Module) -> List[Any]:
    """model.config, its sub-configs at any depth, and the configs of sub-models."""
    seen, out = set(), []
    stack = [model.config]
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if sub is not model and isinstance(sub, transformers.PreTrainedModel) and cfg is not None:
            stack.append(cfg)
    while stack:
        cfg = stack.pop(0)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return out


def _attention_modules(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Modules that compute attention: ``*Attention`` classes with a ``layer_idx``
    or their own projections (containers such as ``*SdpaAttention`` wrappers excluded)."""
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if mod is model or not cls.endswith("Attention"):
            continue
        has_proj = any(isinstance(c, nn.Linear) for c in mod.children())
        if hasattr(mod, "layer_idx") or has_proj:
            found[name] = mod
    return found


def _probe_inputs(model: nn.Module) -> Dict[str, torch.Tensor]:
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    if not vocab:
        raise RuntimeError("patch(verify=True) cannot build a probe input (no config.vocab_size); "
                           "run your own forward pass and call handle.verify()")
    ids = (torch.arange(1, 9, dtype=torch.long) % int(vocab)).unsqueeze(0)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return {"input_ids": ids.to(device)}


def patch(model: nn.Module, config: Optional[DHSAConfig] = None, *, dense_layers: Iterable = (),
          layer_configs: Optional[Mapping[Union[int, str], DHSAConfig]] = None,
          dense_when_fits: bool = True, num_threads: Optional[int] = None,
          keep_selections: Iterable = (), record: bool = True,
          verify: bool = False) -> PatchHandle:
    """Switch a transformers model (and all its sub-configs) to DHSA attention.

    ``config``: the DHSAConfig of every layer (default ``DHSAConfig()``);
    ``dense_layers``: layer indices (``module.layer_idx``) or module names kept
    exact (e.g. ``range(2)``); ``layer_configs``: {layer_idx or name:
    DHSAConfig} overrides; ``dense_when_fits``: run exact attention (no
    prediction) when every query may see no more keys than the budget;
    ``num_threads``: threads of the C core (default: all);
    ``keep_selections``: layers whose Selection objects are kept in the
    stats records (for pictures); ``record``: keep per-call records (call
    counts are always kept); ``verify``: run an 8-token probe forward and
    raise RuntimeError unless every attention module went through DHSA.

    Patching a patched model reconfigures it and returns the same handle
    (unpatch still restores the implementation from before the first patch).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() needs a torch.nn.Module (a transformers model), got {type(model).__name__}")
    cfg0 = getattr(model, "config", None)
    if cfg0 is None or not hasattr(cfg0, "_attn_implementation"):
        missing = "model.config" if cfg0 is None else "model.config._attn_implementation"
        raise TypeError(f"cannot patch {type(model).__name__}: it has no `{missing}`; dhsa.patch works "
                        "on transformers PreTrainedModel instances whose attention goes through "
                        "transformers.AttentionInterface")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"cannot patch {type(model).__name__}: no attention modules found (no "
                         "submodule whose class name ends in 'Attention' with a `layer_idx` or "
                         "its own projections)")
    register()

    handle = get_handle(model)
    if handle is not None and handle.active:
        handle.configure(config, dense_layers=dense_layers, layer_configs=layer_configs,
                         dense_when_fits=dense_when_fits, num_threads=num_threads,
                         keep_selections=keep_selections, record=record)
    else:
        handle = PatchHandle(model, config if config is not None else DHSAConfig(),
                             dense_layers=dense_layers, layer_configs=layer_configs,
                             dense_when_fits=dense_when_fits, num_threads=num_threads,
                             keep_selections=keep_selections, record=record)
        configs = _all_configs(model)
        handle._previous = [(c, _get_impl(c)) for c in configs]
        try:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(IMPLEMENTATION)
            else:  # pragma: no cover - transformers without set_attn_implementation
                for c in configs:
                    _set_impl(c, IMPLEMENTATION)
            not_set = [type(c).__name__ for c in configs if c._attn_implementation != IMPLEMENTATION]
            if not_set:
                raise RuntimeError(
                    f"cannot patch {type(model).__name__}: set_attn_implementation('dhsa') left "
                    f"{not_set} unchanged (the model does not support switching its attention "
                    "implementation through transformers.AttentionInterface)")
        except Exception:
            for c, value in handle._previous:
                _set_impl(c, value)
            raise
        setattr(model, _HANDLE_ATTR, handle)
        handle.active = True
    handle.modules = modules
    with _LOCK:
        for name, mod in modules.items():
            _BINDINGS[mod] = (handle, name)
    handle.reset()
    if verify:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(**_probe_inputs(model), use_cache=False)
            handle.verify()
        except Exception:
            handle.unpatch()
            raise
        finally:
            model.train(was_training)
            handle.reset()
    return handle


def unpatch(model: nn.Module) -> bool:
    """Undo dhsa.patch(model): restore the previous attention implementation(s)
    exactly. Returns False (and does nothing) on a model that is not patched."""
    handle = get_handle(model)
    if handle is None:
        return False
    return handle.unpatch()


# --------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------

_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (float32 / float16), bfloat16 -> float32 copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    elif t.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"DHSA attention supports float32, float16 and bfloat16, got {t.dtype}")
    return t.numpy()


# A few masks are analysed per forward (one per mask type); every layer sees the same
# tensor, so remember the last results by identity.
_MASK_CACHE: "OrderedDict[Tuple, Tuple[weakref.ref, Any]]" = OrderedDict()


def _allowed_mask(mask: torch.Tensor, B: int, Lq: int, Lk: int) -> Optional[torch.Tensor]:
    """(B, Lq, Lk) bool 'may attend' from a 4-D bool or additive mask; None if the
    mask is not a plain 0 / -inf pattern shared by all heads."""
    if mask.dim() != 4 or mask.shape[-2] != Lq or mask.shape[-1] < Lk or mask.shape[0] not in (1, B):
        return None
    mask = mask[..., :Lk]
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if bool((mask.masked_select(allowed) != 0).any()):
            return None  # a real additive bias: not a padding pattern
    else:
        return None
    if allowed.shape[1] > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return None
    allowed = allowed[:, 0]
    if allowed.shape[0] != B:
        allowed = allowed.expand(B, Lq, Lk)
    return allowed


def _spans_of(allowed: torch.Tensor, window: Optional[int]) -> Optional[List[Optional[Tuple[int, int, int, int]]]]:
    """Per batch item (ks, ke, r0, r1): keys [ks, ke) and query rows [r0, r1)
    such that the mask is exactly the causal(/window) pattern of those rows on
    those keys (None for an item with no real query); None if some item's mask
    is not of that form."""
    B, Lq, Lk = allowed.shape
    spans: List[Optional[Tuple[int, int, int, int]]] = []
    cols = torch.arange(Lk)
    rows = torch.arange(Lq)
    for b in range(B):
        M = allowed[b]
        any_row = M.any(dim=1)
        if not bool(any_row.any()):
            spans.append(None)
            continue
        last = (Lk - 1) - torch.flip(M, dims=[1]).to(torch.uint8).argmax(dim=1)
        d = last - rows
        q_off = int(d[any_row].max())
        real = any_row & (d == q_off)
        idx = torch.nonzero(real).flatten()
        r0, r1 = int(idx[0]), int(idx[-1]) + 1
        if not bool(real[r0:r1].all()):
            return None
        valid = M[r0:r1].any(dim=0)
        kidx = torch.nonzero(valid).flatten()
        ks, ke = int(kidx[0]), int(kidx[-1]) + 1
        if ke != q_off + r1:
            return None
        pos = (rows[r0:r1] + q_off)[:, None]
        expected = (cols[None, :] >= ks) & (cols[None, :] <= pos)
        if window is not None:
            expected &= cols[None, :] > pos - window
        if not torch.equal(M[r0:r1], expected):
            return None
        spans.append((ks, ke, r0, r1))
    return spans


def _mask_spans(mask: torch.Tensor, B: int, Lq: int, Lk: int, window: Optional[int]):
    key = (id(mask), B, Lq, Lk, window)
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    allowed = _allowed_mask(mask, B, Lq, Lk)
    spans = None if allowed is None else _spans_of(allowed.cpu(), window)
    try:
        _MASK_CACHE[key] = (weakref.ref(mask), spans)
    except TypeError:  # pragma: no cover - tensors are weak-referenceable
        pass
    while len(_MASK_CACHE) > 8:
        _MASK_CACHE.popitem(last=False)
    return spans


def _allowed_pairs(nq: int, nk: int, window: Optional[int]) -> int:
    """Causally allowed (query, key) pairs of nq last queries over nk keys."""
    pos = np.arange(nk - nq, nk, dtype=np.int64)
    seen = pos + 1
    if window is not None:
        seen = np.minimum(seen, window)
    return int(seen.sum())


def _fits(cfg: DHSAConfig, nk: int, window: Optional[int]) -> bool:
    most = nk if window is None else min(nk, window)
    if cfg.budget_mode == "tokens":
        return most <= cfg.budget
    if cfg.budget_mode == "adaptive":
        return most <= cfg.min_budget
    return False


def _exact_masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: Optional[torch.Tensor], scale: float, softcap: Optional[float],
                  window: Optional[int], causal: bool) -> torch.Tensor:
    """Exact attention in PyTorch with an arbitrary 4-D mask (boolean or additive),
    GQA without repeating K/V; fully masked rows give zeros. (B, H, Lq, D) float32."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = H // Hkv
    q = query.detach().float().reshape(B, Hkv, G, Lq, D)
    k = key.detach().float()[:, :, None]
    v = value.detach().float()[:, :, None]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale          # (B, Hkv, G, Lq, Lk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"DHSA attention expects a 4-D attention mask, got shape {tuple(mask.shape)}")
        m = mask[..., :Lk]
        if m.dtype == torch.bool:
            allowed, bias = m, None
        else:
            allowed, bias = m > torch.finfo(m.dtype).min / 2, m.float()

        def heads(x):
            if x.shape[1] == H:
                return x.reshape(x.shape[0], Hkv, G, Lq, Lk)
            return x[:, :, None]                              # (Bm, 1, 1, Lq, Lk)

        allowed = heads(allowed)
        if bias is not None:
            s = s + heads(bias)
    else:
        pos = torch.arange(Lk - Lq, Lk)[:, None]
        j = torch.arange(Lk)[None, :]
        allowed = (j <= pos) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
        if window is not None:
            allowed = allowed & (j > pos - window)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.matmul(p, v).reshape(B, H, Lq, D)


def dhsa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                           scaling: Optional[float] = None, dropout: float = 0.0,
                           sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                           **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function backed by dhsa (see the module docstring).

    query (B, H, Lq, D), key / value (B, Hkv, Lk, D), queries the last Lq
    positions; returns ((B, Lq, H, D) tensor, None).
    """
    t_start = time.perf_counter()
    binding = _BINDINGS.get(module)
    if binding is None:
        handle, name = default_handle(), f"{type(module).__name__}@{id(module):x}"
    else:
        handle, name = binding
    layer = getattr(module, "layer_idx", None)

    if dropout and getattr(module, "training", False):
        raise NotImplementedError("DHSA attention is inference-only: attention dropout in training "
                                  "mode is not supported (call model.eval())")
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"DHSA attention does not support the `{unsupported}` "
                                      f"argument this model passes ({type(module).__name__})")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions", "DHSA attention returns no attention weights "
                   "(output_attentions=True gives None)")
    if query.device.type != "cpu":
        raise RuntimeError(f"DHSA attention runs on the CPU; got tensors on {query.device}")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        if getattr(module, "training", False):
            raise RuntimeError("DHSA attention is inference-only (no backward): use model.eval() "
                               "and torch.no_grad() / torch.inference_mode()")
        _warn_once("grad", "DHSA attention outputs carry no gradient; run under torch.no_grad() "
                   "to silence this warning")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"DHSA attention expects 4-D (B, H, L, D) tensors, got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Lq > Lk:
        raise ValueError(f"more queries ({Lq}) than keys ({Lk})")

    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    causal = bool(causal)
    window = int(sliding_window) if sliding_window is not None and int(sliding_window) > 0 else None
    cap = float(softcap) if softcap is not None and float(softcap) > 0 else None
    cfg, forced_dense = handle.config_for(layer, name)
    keep_sel = layer in handle.keep_selections or name in handle.keep_selections
    threads = handle.num_threads

    # ---- which keys / queries each batch item really has -------------------------------
    spans: Optional[List[Optional[Tuple[int, int, int, int]]]]
    padded = False
    if not causal and window is not None:
        spans = None  # a bidirectional sliding window: not a DHSA pattern
    elif attention_mask is None:
        if causal and Lq > 1 and Lk > Lq:
            # Only an empty StaticCache prefill gets here (transformers skips the mask when
            # it is the plain causal one): the slots past Lq are unused, as in sdpa.
            spans = [(0, Lq, 0, Lq)] * B
        else:
            spans = [(0, Lk, 0, Lq)] * B
    elif not causal:
        spans = None
    else:
        spans = _mask_spans(attention_mask, B, Lq, Lk, window)
        if spans is not None:
            padded = any(s != (0, Lk, 0, Lq) for s in spans)

    out_dtype = query.dtype
    if spans is None:
        # a mask that is not causal + padding (+ window): exact, masked, in PyTorch
        t0 = time.perf_counter()
        out = _exact_masked(query, key, value, attention_mask, scale, cap, window, causal)
        t1 = time.perf_counter()
        result = out.to(out_dtype).transpose(1, 2).contiguous()
        handle._add(CallRecord(layer, name, "fallback", B, H, Hkv, Lq, Lk, 1.0, 0.0, t1 - t0,
                               time.perf_counter() - t_start, window, cap, attention_mask is not None,
                               "non-causal module" if not causal else "mask is not causal+padding"))
        return result, None

    qn, kn, vn = _to_numpy(query), _to_numpy(key), _to_numpy(value)

    stats = {"predict": 0.0, "attn": 0.0, "sel_w": 0.0, "w": 0.0, "paths": set(), "reason": set(),
             "selection": None}

    def run(qi: np.ndarray, ki: np.ndarray, vi: np.ndarray) -> np.ndarray:
        nq, nk = qi.shape[2], ki.shape[2]
        win = window if window is not None and window < nk else None
        weight = float(_allowed_pairs(nq, nk, win)) * qi.shape[0]
        stats["w"] += weight
        if nq == 1 or forced_dense or (handle.dense_when_fits and _fits(cfg, nk, win)) or not causal:
            path = "decode" if nq == 1 else "dense"
            stats["reason"].add("decode" if nq == 1 else "dense layer" if forced_dense
                                else "non-causal" if not causal else "fits budget")
            t0 = time.perf_counter()
            o = dense_attention(qi, ki, vi, causal=causal, scale=scale, softcap=cap, window=win,
                                num_threads=threads)
            stats["attn"] += time.perf_counter() - t0
            stats["sel_w"] += weight
            stats["paths"].add(path)
            return o
        o, info = sparse_attention(qi, ki, vi, cfg, causal=True, scale=scale, softcap=cap,
                                   window=win, num_threads=threads, return_info=True)
        stats["predict"] += info.predict_seconds
        stats["attn"] += info.attention_seconds
        stats["sel_w"] += weight * info.density
        stats["paths"].add("sparse")
        if keep_sel and stats["selection"] is None:
            stats["selection"] = info.selection
        return o

    if all(s == spans[0] for s in spans) and spans[0] is not None:
        ks, ke, r0, r1 = spans[0]
        o = run(qn[:, :, r0:r1], kn[:, :, ks:ke], vn[:, :, ks:ke])
        if (r0, r1) == (0, Lq):
            out_np = o
        else:
            out_np = np.zeros((B, H, Lq, D), dtype=o.dtype)
            out_np[:, :, r0:r1] = o
    else:
        out_np = None
        for b, s in enumerate(spans):
            if out_np is None:
                out_np = np.zeros((B, H, Lq, D), dtype=qn.dtype)
            if s is None:
                continue
            ks, ke, r0, r1 = s
            out_np[b:b + 1, :, r0:r1] = run(qn[b:b + 1, :, r0:r1], kn[b:b + 1, :, ks:ke],
                                             vn[b:b + 1, :, ks:ke])

    out = torch.from_numpy(out_np)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    result = out.transpose(1, 2).contiguous()
    paths = stats["paths"]
    path = ("sparse" if "sparse" in paths else "dense" if "dense" in paths
            else "decode" if "decode" in paths else "dense" if Lq > 1 else "decode")
    density = stats["sel_w"] / stats["w"] if stats["w"] > 0 else 1.0
    handle._add(CallRecord(layer, name, path, B, H, Hkv, Lq, Lk, density, stats["predict"],
                           stats["attn"], time.perf_counter() - t_start, window, cap, padded,
                           ",".join(sorted(stats["reason"])), stats["selection"]))
    return result, None


register()
