"""Peak memory per rank: the cheap measure training logs, and an exact allocator-level one for benchmarks.

Training (metrics.jsonl ``peak_memory_mib``, reset every log window):
- CUDA: ``torch.cuda.max_memory_allocated`` (bytes of live tensors, the caching allocator's peak);
- CPU: the process's peak resident set size, ``VmHWM`` in /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs. It includes everything the process maps (the torch libraries: ~0.3 GiB) and memory
  that glibc keeps after a free, so it bounds the tensor peak from above.

``AllocatorPeak`` (benchmarks, tests): the peak of bytes held by tensors allocated inside a window, above
what was live at its start. On CPU it replays the allocation and free events that c10's CPU allocator reports
to torch's profiler: exact and deterministic, but the profiler costs time, so training does not use it. The
MoE row buffers come from moe_dist's own CPU cache (``moe_dist.moe.buffers``), which the profiler does not
see: their peak over the window is added (an upper bound: the two peaks may fall at different moments).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moe_dist.moe.buffers import cache_stats

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_source(device: torch.device) -> str:
    return "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_vmhwm"


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak window on this rank."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(PROC_CLEAR_REFS, "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # not Linux, or not permitted: the peak then runs from process start


def peak_memory_bytes(device: torch.device) -> float:
    """This rank's peak since the last reset (NaN where no measure exists)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return math.nan


class AllocatorPeak:
    """``with AllocatorPeak(device) as peak: ...`` then ``peak.bytes``: the most bytes held at any moment by
    tensors allocated inside the window, net of their frees inside it. On CPU the profiler leaves out the free
    of a block allocated before the window (its size is unknown to it), so such frees are not subtracted: an
    upper bound when the window frees older tensors (a training step frees few: gradients go at ``zero_grad``, before it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.profile = None  # CPU: the torch profiler of the window (its op events are there too)

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._cached_start = cache_stats(reset_peak=True)["used_bytes"]
            self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self.profile.__exit__(*exc)
        events = [e for e in self.profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            if event.device_type() == torch.autograd.DeviceType.CPU:
                live += event.nbytes()
                peak = max(peak, live)
        self.bytes = peak + cache_stats()["peak_used_bytes"] - self._cached_start
