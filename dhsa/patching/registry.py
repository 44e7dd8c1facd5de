"""The registry and the handle: ``patch`` / ``unpatch`` / ``get_handle`` and
``register`` (``"dhsa"`` in transformers' attention and mask interfaces).

Each patched attention module is bound to its :class:`PatchHandle` (weakly,
so that a dropped model frees its modules); the attention function finds
its handle through :func:`binding_of`, and modules reached without
``dhsa.patch`` (``attn_implementation="dhsa"`` at load time) report to
:func:`default_handle`.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import transformers
from torch import nn

try:  # transformers >= 4.50
    from transformers import AttentionInterface
except ImportError:  # pragma: no cover - older transformers: a plain dict
    AttentionInterface = None
try:  # transformers >= 4.53: masks built per attention implementation
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover - older models build 4-D float masks themselves
    AttentionMaskInterface = sdpa_mask = None

from ..config import DHSAConfig
from .decode import DecodeStates
from .stats import CallRecord, format_summary, mean_density, summarize

__all__ = ["IMPLEMENTATION", "PatchHandle", "binding_of", "default_handle", "get_handle",
           "patch", "register", "unpatch"]

IMPLEMENTATION = "dhsa"

# attention module -> (handle, module name); weak so that a dropped model frees its modules
_BINDINGS: "weakref.WeakKeyDictionary[nn.Module, Tuple[PatchHandle, str]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_DEFAULT_HANDLE: Optional["PatchHandle"] = None
_HANDLE_ATTR = "_dhsa_handle"


def register() -> None:
    """Register ``"dhsa"`` with transformers' attention and mask interfaces (idempotent).

    Done on import of :mod:`dhsa.patching`; call again if something reset the registries.
    """
    from .forward import dhsa_attention_forward  # the forward needs this module's bindings
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


class PatchHandle:
    """What ``dhsa.patch`` did to a model, and what DHSA did since.

    Attributes: ``config`` (the DHSAConfig of every layer not overridden),
    ``dense_layers``, ``layer_configs`` (overrides keyed by ``layer_idx`` or
    module name), ``dense_when_fits``, ``sparse_sliding``, ``num_threads``, ``keep_selections``
    (layers whose Selection objects are kept in the records), ``stats``
    (list of :class:`CallRecord`), ``calls`` (module name -> number of calls),
    ``modules`` (module name -> attention module that should call DHSA).
    """

    def __init__(self, model: Optional[nn.Module], config: DHSAConfig, *,
                 dense_layers: Iterable = (), layer_configs: Optional[Mapping] = None,
                 dense_when_fits: bool = True, sparse_sliding: bool = False,
                 num_threads: Optional[int] = None, keep_selections: Iterable = (),
                 record: bool = True, decode_threads: Optional[int] = 1) -> None:
        self.model = model
        self.modules: "OrderedDict[str, nn.Module]" = OrderedDict()
        self._previous: List[Tuple[Any, Any]] = []
        self.active = False
        self.stats: List[CallRecord] = []
        self.calls: Dict[str, int] = defaultdict(int)
        # sparse decode (DHSAConfig.decode_budget): a KVCache per layer
        self.decode_states = DecodeStates()
        self.configure(config, dense_layers=dense_layers, layer_configs=layer_configs,
                       dense_when_fits=dense_when_fits, sparse_sliding=sparse_sliding,
                       num_threads=num_threads, keep_selections=keep_selections, record=record,
                       decode_threads=decode_threads)

    # -- configuration ----------------------------------------------------------------
    def configure(self, config: Optional[DHSAConfig] = None, *, dense_layers: Iterable = (),
                  layer_configs: Optional[Mapping] = None, dense_when_fits: bool = True,
                  sparse_sliding: bool = False, num_threads: Optional[int] = None,
                  keep_selections: Iterable = (), record: bool = True,
                  decode_threads: Optional[int] = 1) -> None:
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
        if decode_threads is not None and (not isinstance(decode_threads, int)
                                           or decode_threads < 1):
            raise ValueError(f"decode_threads must be a positive int or None, got "
                             f"{decode_threads!r}")
        self.config = config
        self.dense_layers = dense
        self.layer_configs = overrides
        self.dense_when_fits = bool(dense_when_fits)
        self.sparse_sliding = bool(sparse_sliding)
        self.num_threads = num_threads
        self.decode_threads = decode_threads
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
        return summarize(self.stats)

    def mean_density(self, include_dense: bool = True) -> Optional[float]:
        """Mean density over the recorded prefill calls (sparse only if not include_dense)."""
        return mean_density(self.stats, include_dense)

    def format_summary(self) -> str:
        """The summary as a text table."""
        return format_summary(self.summary())

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
        self.decode_states.clear()
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
          dense_when_fits: bool = True, sparse_sliding: bool = False,
          num_threads: Optional[int] = None, keep_selections: Iterable = (),
          record: bool = True, verify: bool = False,
          decode_threads: Optional[int] = 1) -> PatchHandle:
    """Switch a transformers model (and all its sub-configs) to DHSA attention.

    ``config``: the DHSAConfig of every layer (default ``DHSAConfig()``);
    ``dense_layers``: layer indices (``module.layer_idx``) or module names kept
    exact (e.g. ``range(2)``); ``layer_configs``: {layer_idx or name:
    DHSAConfig} overrides; ``dense_when_fits``: run exact attention (no
    prediction) when every query may see no more keys than the budget;
    ``sparse_sliding``: let sliding-window layers run the sparse path too
    (default: they run the exact windowed kernel, O(L * window), so only the
    full-attention layers pay for and use a prediction); ``num_threads``: threads of the C core (default: all);
    ``decode_threads``: threads of a one-query call (a decode step; default 1,
    None: ``num_threads``) - a step's attention is a small job, and PyTorch's
    own OpenMP threads, still spinning after the layer's matrix products,
    would take the cores a team of ours wakes on;
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

    options = dict(dense_layers=dense_layers, layer_configs=layer_configs,
                   dense_when_fits=dense_when_fits, sparse_sliding=sparse_sliding,
                   num_threads=num_threads, keep_selections=keep_selections, record=record,
                   decode_threads=decode_threads)
    handle = get_handle(model)
    if handle is not None and handle.active:
        handle.configure(config, **options)
    else:
        handle = PatchHandle(model, config if config is not None else DHSAConfig(), **options)
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


def binding_of(module: nn.Module) -> Tuple["PatchHandle", str]:
    """(handle, module name) of an attention module; the default handle if unbound."""
    binding = _BINDINGS.get(module)
    if binding is None:
        return default_handle(), f"{type(module).__name__}@{id(module):x}"
    return binding
