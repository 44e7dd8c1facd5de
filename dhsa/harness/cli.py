"""Options the harness commands share: the DHSAConfig knobs, --threads, --dense-layers."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from ..config import GRANULARITIES

# DHSAConfig fields a command may set from the command line
CONFIG_OPTIONS = ("block_size", "sink", "local", "threshold", "granularity")


def threads_option(text: str) -> int:
    """argparse type of ``--threads``: a positive int."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of threads, got {n}")
    return n


def add_config_options(p: argparse.ArgumentParser, *, threshold: bool = True) -> None:
    """--block-size, --sink, --local, [--threshold,] --granularity (None: DHSAConfig's
    default), --dense-layers and --threads."""
    p.add_argument("--block-size", type=int, default=None,
                   help="queries per block (default: DHSAConfig's, 64)")
    p.add_argument("--sink", type=int, default=None,
                   help="first keys every block keeps (default: DHSAConfig's, 64)")
    p.add_argument("--local", type=int, default=None,
                   help="keys before each block it always keeps (default: DHSAConfig's, 256)")
    if threshold:
        p.add_argument("--threshold", type=float, default=None,
                       help="boundary score that opens a new chunk (default: DHSAConfig's, 0.2)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None,
                   help="one selection per layer, KV head or query head (default: kv_head)")
    p.add_argument("--dense-layers", type=int, default=0,
                   help="keep the first N layers exact under every sparse method (default 0)")
    p.add_argument("--threads", type=threads_option, default=None,
                   help="threads of the C core (default: all cores)")


def config_changes(args: argparse.Namespace) -> Dict[str, Any]:
    """The DHSAConfig fields the options set (those left at None keep the defaults)."""
    return {k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k, None) is not None}
