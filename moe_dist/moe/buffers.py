"""Row buffers of the MoE exchange on CPU: send and receive buffers, expert activations and outputs, their
gradients.

PyTorch has no caching allocator on CPU: every allocation of 32 MiB or more is a fresh ``mmap`` from glibc,
and each 4 KiB page costs a page fault on first touch (about 2 µs on this project's machines), so a
[32768, 256] fp32 buffer costs 8,193 faults, more than the pass that fills it; zeroing even huge pages
costs ~6 ms per 32 MiB. Large buffers made here come from a small cache of anonymous mappings instead:
each mapping is backed by transparent huge pages (``madvise(MADV_HUGEPAGE)``) and reused as soon as no
tensor uses it any more (its reference count, which every tensor view and every autograd-saved tensor of
it holds, is back to the cache's own). Steady state: no page faults and no zeroing for these buffers. CUDA
buffers and small ones are plain ``new_empty``.
"""

from __future__ import annotations

import math
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 * HUGE_PAGE  # smaller buffers come from glibc's heap, whose pages are reused anyway
CLASSES_PER_DOUBLING = 4  # sizes are rounded up to 2^(k/4) MiB: at most 19% slack, and reuse across steps
MAX_FREE = 32  # free mappings kept; beyond that the least recently used go back to the system


class _Cache:
    def __init__(self) -> None:
        self.free: list[tuple[int, mmap.mmap]] = []  # (capacity, mapping), most recently used last
        self.used: list[tuple[int, mmap.mmap]] = []
        self.peak_used_bytes = 0  # high-water mark of the capacity in use (see cache_stats)

    def take(self, nbytes: int) -> mmap.mmap:
        self._collect()
        capacity = _size_class(nbytes)
        fits = [i for i, (c, _) in enumerate(self.free) if capacity <= c <= 2 * capacity]
        if fits:
            entry = self.free.pop(min(fits, key=lambda i: self.free[i][0]))
        else:
            mapping = mmap.mmap(-1, capacity + HUGE_PAGE)  # lazily zeroed; + room to start at a huge page
            if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                mapping.madvise(mmap.MADV_HUGEPAGE)  # advice only: a refusal changes nothing
            entry = (capacity, mapping)
        self.used.append(entry)
        self.peak_used_bytes = max(self.peak_used_bytes, sum(c for c, _ in self.used))
        return entry[1]

    def _collect(self) -> None:
        """Mappings no tensor refers to any more go back to the free list."""
        still_used = []
        for entry in self.used:
            # References: this list's tuple and getrefcount's argument. Each tensor storage adds one.
            (still_used if sys.getrefcount(entry[1]) > 2 else self.free).append(entry)
        self.used = still_used
        del self.free[:-MAX_FREE]


def _size_class(nbytes: int) -> int:
    k = math.ceil(CLASSES_PER_DOUBLING * math.log2(max(nbytes, 1)))
    return -(-int(2 ** (k / CLASSES_PER_DOUBLING)) // HUGE_PAGE) * HUGE_PAGE


_CACHE = _Cache()


def cache_stats(*, reset_peak: bool = False) -> dict[str, int]:
    """Bytes of the row-buffer cache: in use now, the most in use at once (since the last reset), and held
    from the system (in use + free). Memory measured through torch's allocator does not include them."""
    _CACHE._collect()
    used = sum(c for c, _ in _CACHE.used)
    stats = {
        "used_bytes": used,
        "peak_used_bytes": max(_CACHE.peak_used_bytes, used),
        "reserved_bytes": used + sum(c for c, _ in _CACHE.free),
    }
    if reset_peak:
        _CACHE.peak_used_bytes = used
    return stats


def new_rows(like: torch.Tensor, shape: tuple[int, ...], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``like.new_empty(shape)``, from the cache of reused huge-page mappings when large and on CPU."""
    dtype = dtype or like.dtype
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if like.device.type != "cpu" or nbytes < MIN_BYTES:
        return like.new_empty(shape, dtype=dtype)
    mapping = _CACHE.take(nbytes)
    start = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    offset = -start % HUGE_PAGE
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset).view(shape)
