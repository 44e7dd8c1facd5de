"""Where a result came from: the git state of the checkout and the machine."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["cpu_model", "git_state", "machine"]

_ROOT = Path(__file__).resolve().parents[2]


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root=None) -> Dict[str, Any]:
    """{"commit": HEAD or None, "core_sources_modified": whether csrc/ or dhsa/
    differ from it (None outside a git checkout)} of the checkout at ``root``
    (default: the one this dhsa is imported from)."""
    root = _ROOT if root is None else Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--", "csrc", "dhsa") if commit else None
    return {"commit": commit or None,
            "core_sources_modified": bool(status) if status is not None else None}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine() -> str:
    """"<CPU model> (<arch>, <n> cores)"."""
    return f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)"
