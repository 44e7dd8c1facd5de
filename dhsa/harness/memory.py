"""Peak resident memory of this process, from the kernel (Linux).

C and BLAS allocations are invisible to tracemalloc, so the demo, the
evaluation and the benchmarks read ``/proc/self/status`` instead: reset the
high-water mark (VmHWM) to the current RSS, run, read it back.
"""
from __future__ import annotations

import resource
from typing import Optional

__all__ = ["reset_peak_rss", "rss_kib", "peak_rss_mib"]


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> Optional[int]:
    """A KiB field of /proc/self/status (``VmRSS``, ``VmHWM``), None if unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """VmHWM in MiB (getrusage's lifetime peak where /proc is unavailable)."""
    hwm = rss_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024.0
