"""Timing harness of :mod:`benchmarks.speed`: wall time, process CPU time and peak memory of one call, and
contenders run alternately so that a busy machine slows them all alike.

CPU time is the steadier figure on a shared machine: other jobs stretch wall time but barely change the
CPU time a single-threaded run needs. Peak resident memory is the kernel's ``VmHWM``, reset before every
call (Linux). Once CUDA is in use, every call is bracketed by ``torch.cuda.synchronize()`` (so wall time
includes the kernels queued; CPU time counts the host only) and the device's peak allocated memory is
recorded too.

Example::

    runs = alternate({"ours": lambda: generate(model, ids, mask), "theirs": lambda: model.generate(ids)},
                     repeats=3)
    summary(runs["ours"], per=steps)   # median and spread of ms per step, peak RSS
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["Run", "timed", "alternate", "summary"]


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field_name: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process in MiB."""
    with open("/proc/self/status") as handle:
        match = re.search(rf"{field_name}:\s+(\d+) kB", handle.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that a
    run's peak RSS is not hidden by memory an earlier run freed but the process kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Run:
    """One timed call."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float       # the process's peak RSS during the call
    extra_rss_mb: float      # that peak minus the RSS just before the call: what the call itself added
    output: Any = field(repr=False, default=None)
    peak_device_mb: float | None = None  # CUDA: the peak memory torch allocated on the device during the call


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def timed(fn: Callable[[], Any]) -> Run:
    """Call ``fn`` once and record wall time, process CPU time and peak RSS during the call (and, with CUDA
    in use, peak device memory, the device synchronised before and after)."""
    _release_free_memory()
    cuda = _cuda_in_use()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb("VmRSS")
    _peak_rss_reset()
    wall, cpu = time.perf_counter(), time.process_time()
    output = fn()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _rss_mb("VmHWM")
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Run(wall_s=wall, cpu_s=cpu, peak_rss_mb=peak, extra_rss_mb=peak - before, output=output,
               peak_device_mb=device_peak)  # fmt: skip


def alternate(contenders: dict[str, Callable[[], Any]], *, repeats: int, start: int = 0) -> dict[str, list[Run]]:
    """Run every contender ``repeats`` times, interleaved, the order rotated each repeat (A B C, B C A, ...);
    ``start`` rotates the first repeat too."""
    names = list(contenders)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for repeat in range(start, start + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(timed(contenders[name]))
    return runs


def summary(runs: Sequence[Run], *, per: float = 1.0) -> dict[str, float]:
    """Median and min/max of wall and CPU time (divided by ``per``), the largest peak RSS (and peak device
    memory, where recorded)."""
    walls = [r.wall_s / per for r in runs]
    cpus = [r.cpu_s / per for r in runs]
    found = {
        "wall_median": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
        "cpu_median": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus),
        "peak_rss_mb": max(r.peak_rss_mb for r in runs), "extra_rss_mb": max(r.extra_rss_mb for r in runs),
        "repeats": len(runs),
    }
    device_peaks = [r.peak_device_mb for r in runs if r.peak_device_mb is not None]
    if device_peaks:
        found["peak_device_mb"] = max(device_peaks)
    return found
