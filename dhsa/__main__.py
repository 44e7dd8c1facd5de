"""Command line of dhsa: ``python -m dhsa <command> ...`` (also the ``dhsa`` script).

To add a command, add an entry to ``COMMANDS``: name -> (module, help), the
module providing ``add_arguments(parser)`` and ``run(args) -> int``; or
name -> ("module:prefix", help) for ``prefix_add_arguments`` / ``prefix_run``.
The commands live in the research harness, :mod:`dhsa.harness`.

A command whose options make a :class:`dhsa.DHSAConfig` sets the default
``_config`` to a function ``args -> DHSAConfig``: it runs right after parsing
and a config that is not valid ends in an argparse error (exit status 2)
naming the option, before anything is loaded. The config is ``args.config``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

# PyTorch's OpenMP threads spin for a while after every op, on the cores the
# C core's team wakes on next (a decode step ran 1.7x slower so on 2 cores);
# sleeping threads cost a wake-up per op instead. Read when the OpenMP
# runtimes load, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS: Dict[str, Tuple[str, str]] = {
    "demo": ("dhsa.harness.demo", "pass-key retrieval on SmolLM2 or Gemma-3: exact attention vs DHSA"),
    "niah": ("dhsa.harness.eval:niah",
             "needle in a haystack per method, ROUGE and retrieval (JSON + heat maps)"),
    "ppl": ("dhsa.harness.eval:ppl", "causal perplexity of long text per method and budget"),
    "recall": ("dhsa.harness.eval:recall",
               "attention-mass recall and output error on real Q/K/V"),
    "tasks": ("dhsa.harness.sweep",
              "exact-match retrieval, copy and causal perplexity per method at equal density "
              "(resumable JSONL)"),
    "calibrate": ("dhsa.harness.calibrate",
                  "fit density budgets per layer and KV head from a model's attention (JSON)"),
    "table": ("dhsa.harness.sweep:table",
              "summary of sweep files: scores with 95% confidence intervals, heat maps"),
}


def _entry(spec: str):
    """'module' -> (module.add_arguments, module.run); 'module:prefix' ->
    (module.prefix_add_arguments, module.prefix_run)."""
    module, _, prefix = spec.partition(":")
    mod = importlib.import_module(module)
    pre = f"{prefix}_" if prefix else ""
    return getattr(mod, pre + "add_arguments"), getattr(mod, pre + "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dhsa",
                                     description="Dynamic Hierarchical Sparse Attention on the CPU")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _parser=p)
        _entry(module)[0](p)
    return parser


def _option_names(message: str) -> str:
    """'DHSAConfig.block_size ...' -> '--block-size ...': the option, as typed."""
    return re.sub(r"DHSAConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    make = getattr(args, "_config", None)
    if make is not None:
        try:
            args.config = make(args)
        except (TypeError, ValueError) as exc:
            args._parser.error(_option_names(str(exc)))  # exits with status 2
    return int(_entry(args._module)[1](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
