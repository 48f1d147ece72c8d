"""Row buffers of the MoE exchange (send and receive buffers, expert outputs, their gradients).

On CPU, glibc serves every allocation of 32 MiB or more with a fresh ``mmap``, and each 4 KiB page of it
costs a page fault on first touch (about 2 µs on this project's machines): a [32768, 256] fp32 buffer
costs 8,193 faults, more than the pass that fills it. Buffers made here ask the kernel for transparent huge
pages (``madvise(MADV_HUGEPAGE)``, honoured when /sys/kernel/mm/transparent_hugepage/enabled is ``always``
or ``madvise``): measured 8,193 → 528 faults and 31 → 5 ms for one pass over such a buffer. PyTorch's own
switch for all of its allocations is the environment variable ``THP_MEM_ALLOC_ENABLE=1`` (read once, at
start-up). CUDA buffers are plain ``new_empty``.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 * HUGE_PAGE  # smaller buffers come from glibc's heap, whose pages are reused
MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def new_rows(like: torch.Tensor, shape: tuple[int, ...], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``like.new_empty(shape)``; on CPU, large buffers are backed by huge pages where the kernel allows."""
    out = like.new_empty(shape, dtype=dtype)
    if out.device.type == "cpu" and _MADVISE is not None and out.nbytes >= MIN_BYTES:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (out.data_ptr() + out.nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out
