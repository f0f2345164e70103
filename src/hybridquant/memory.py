"""Resident memory of this process: now, at its peak, and the peak of one phase (Linux ``VmHWM``,
which writing 5 to ``/proc/self/clear_refs`` resets)."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory now."""
    value = _status_mib("VmRSS")
    return value if value is not None else peak_mib()


def peak_mib() -> float:
    """Peak resident memory since the process started or since ``reset_peak``."""
    value = _status_mib("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> bool:
    """Start a new peak from the current resident memory; False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gather(value):
    """``value`` of every rank, in rank order (collective)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
