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

What each call does (``dhsa_attention_forward``, in :mod:`.forward`):

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

No mask with more keys than queries is what transformers passes for a
prefill into an empty StaticCache (queries at positions 0..Lq-1): that reading
is taken only when the key/value slots past Lq are all zero, and recorded
(``reason="empty static cache slots"``); otherwise the call raises ValueError.

DHSA is an inference method: training-mode dropout raises, and outputs carry
no gradient (a warning says so once if gradients were requested).

The pieces, as transformers splits ``integrations/sdpa_attention.py`` from
its mask and cache utilities: :mod:`.registry` (``patch`` / ``unpatch`` /
``get_handle`` / ``register`` and :class:`PatchHandle`), :mod:`.masks`
(mask -> key spans, the exact masked fallback), :mod:`.stats`
(:class:`CallRecord`, summaries) and :mod:`.forward` (the attention function).
"""
from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("dhsa.patching needs PyTorch (pip install torch==2.13.0)") from exc
try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError('dhsa.patching needs transformers (pip install "transformers>=4.48")') from exc

from .forward import dhsa_attention_forward
from .registry import (IMPLEMENTATION, PatchHandle, default_handle, get_handle, patch, register,
                       unpatch)
from .stats import PATHS, CallRecord

__all__ = [
    "IMPLEMENTATION",
    "PATHS",
    "CallRecord",
    "PatchHandle",
    "default_handle",
    "dhsa_attention_forward",
    "get_handle",
    "patch",
    "register",
    "unpatch",
]

register()
