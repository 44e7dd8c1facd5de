"""Command line of dhsa: ``python -m dhsa <command> ...`` (also the ``dhsa`` script).

To add a command, add an entry to ``COMMANDS``: name -> (module, help), the
module providing ``add_arguments(parser)`` and ``run(args) -> int``; or
name -> ("module:prefix", help) for ``prefix_add_arguments`` / ``prefix_run``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

COMMANDS: Dict[str, Tuple[str, str]] = {
    "demo": ("dhsa.demo", "pass-key retrieval on SmolLM2: exact attention vs DHSA"),
    "niah": ("dhsa.eval:niah", "needle in a haystack on SmolLM2 per method (JSON + heat maps)"),
    "ppl": ("dhsa.eval:ppl", "perplexity of long text on SmolLM2 per method and budget"),
    "recall": ("dhsa.eval:recall", "attention-mass recall and output error on real Q/K/V"),
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
        p.set_defaults(_module=module)
        _entry(module)[0](p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(_entry(args._module)[1](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
