"""Memory probes: what this machine (or GPU) has free, how this process's allocators keep freed
memory, and the peak memory this process used.

    available_memory_bytes(device)     free GPU memory, or MemAvailable capped by the cgroup limit
    keep_freed_memory()                glibc keeps freed blocks for reuse (faster, bigger heap)
    use_expandable_segments()          the CUDA caching allocator grows segments in place
    reset_peak_memory(device)          start the peak counter again (training: once per log line)
    peak_memory_bytes(device)          max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU

The planner's estimate (planner.py) predicts what peak_memory_bytes reads; memory_measure.py runs
the training step that checks it.
"""
from __future__ import annotations

import ctypes
import os
import resource
from pathlib import Path

import torch


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory a new training step could use now: free GPU memory, or on CPU MemAvailable (capped by
    the cgroup limit where one is set)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_bytes("MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(available)


def _meminfo_bytes(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")



# ------------------------------------------------------------------------------------------------
# This process: how its allocators keep memory, and its peak (what the planner is calibrated
# against, what bench and the training loop report).

def keep_freed_memory() -> bool:
    """Keep memory PyTorch frees in this process for reuse instead of handing it back to the OS.

    glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mmap and
    unmaps it on free, so on large lattices every activation of every flow step is born in
    untouched pages and pays a page fault per 4 KiB, which on this project's CPU machine costs about
    as much as the matmuls: scale-300 at batch 1 trains a step in 23 s with this instead of 40 s.
    The price is fragmentation: freed blocks stay in the heap, and peak RSS grows (scale-300: 6.5 GB
    instead of 3.0 GB), beyond what the planner's headroom was measured for.
    Process-wide and for the rest of the process; glibc only (returns False elsewhere).
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second: newer torch's name
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments() -> str:
    """Let the CUDA caching allocator grow segments in place, unless the user configured it.

    Flow tensors change size every step (arrivals, spawning), and with fixed-size segments the
    freed blocks of one step rarely fit the next, so max_memory_reserved climbs far above
    max_memory_allocated. The environment variable only counts before CUDA initialises; after
    that, the allocator's settings are changed in place. Returns what was done, for the log."""
    if any(os.environ.get(name) for name in ALLOC_CONF_VARS):
        return "kept the user's allocator settings"
    if not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
        return "PYTORCH_CUDA_ALLOC_CONF=" + EXPANDABLE_SEGMENTS
    # Private APIs (the first is newer torch's name for the second); the run goes on without them.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        setter(EXPANDABLE_SEGMENTS)
        return "allocator settings: " + EXPANDABLE_SEGMENTS
    except (TypeError, RuntimeError) as e:
        return f"expandable segments unavailable ({e})"


def reset_peak_memory(device: torch.device, *, return_freed_memory: bool = True) -> None:
    """Start the peak-memory counter again from what is in use now. On CPU, `return_freed_memory`
    first hands glibc's freed heap back, so the peak starts from live memory (what a measurement
    wants; a training loop that keeps freed memory on purpose passes False)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        if return_freed_memory:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
