"""Peak-memory probes for the trainer's metrics and ``oprd bench loss``.

On CUDA: the caching allocator's figures (``max_memory_allocated`` after ``reset_peak_memory_stats``).
On CPU: the process's resident set; its high-water mark ``VmHWM`` is reset by writing ``5`` to
``/proc/self/clear_refs`` (Linux). Where that is not possible the peak is ``ru_maxrss`` (never reset).
"""

from __future__ import annotations

import re

import torch

_STATUS = "/proc/self/status"


def _status_kb(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak window; returns False when the CPU peak cannot be reset here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    v = _status_kb("VmRSS")
    return int(v) if v is not None else 0


def peak_bytes(device: torch.device) -> int:
    """Peak since the last :func:`reset_peak` (CUDA allocated bytes, or the process's peak RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    v = _status_kb("VmHWM")
    if v is not None:
        return int(v)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
