"""The CPU cache of large row buffers: a buffer is reused only once no tensor refers to it any more."""

from __future__ import annotations

import torch

from moe_dist.moe import buffers
from moe_dist.moe.buffers import HUGE_PAGE, MIN_BYTES, new_rows

ROWS, DIM = MIN_BYTES // (4 * 256) + 1, 256  # just over the size the cache takes


def test_small_buffers_are_plain_allocations():
    like = torch.zeros(1)
    t = new_rows(like, (4, 4))
    assert t.shape == (4, 4) and t.dtype == like.dtype
    assert new_rows(like, (4, 4), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_reused_only_when_no_view_or_saved_tensor_is_left():
    like = torch.zeros(1)
    a = new_rows(like, (ROWS, DIM))
    assert a.data_ptr() % HUGE_PAGE == 0 and a.is_contiguous()
    first = a.data_ptr()
    view = a[3:5]
    del a
    b = new_rows(like, (ROWS, DIM))
    assert b.data_ptr() != first  # a view still uses the first buffer
    del view, b
    c = new_rows(like, (ROWS + 7, DIM))  # the same size class
    assert c.data_ptr() == first  # reused
    w = torch.randn(DIM, 3, requires_grad=True)
    loss = (c @ w).sum()  # autograd saves c
    del c
    d = new_rows(like, (ROWS, DIM))
    assert d.data_ptr() != first
    del d
    loss.backward()
    del loss
    assert new_rows(like, (ROWS, DIM)).data_ptr() == first


def test_buffers_hold_what_is_written():
    like = torch.zeros(1, dtype=torch.float64)
    t = new_rows(like, (ROWS // 2, DIM))
    t.copy_(torch.arange(t.numel(), dtype=torch.float64).view_as(t))
    assert t.dtype == torch.float64 and t[-1, -1].item() == t.numel() - 1


def test_size_classes_leave_at_most_a_fifth_unused():
    for nbytes in [MIN_BYTES, 33 << 20, 100 << 20, 1 << 30]:
        capacity = buffers._size_class(nbytes)
        assert nbytes <= capacity <= 1.2 * nbytes + HUGE_PAGE


def test_stats_count_the_bytes_in_use_and_their_peak():
    like = torch.zeros(1)
    base = buffers.cache_stats(reset_peak=True)["used_bytes"]
    a, b = new_rows(like, (ROWS, DIM)), new_rows(like, (ROWS, DIM))
    nbytes = a.nbytes
    assert buffers.cache_stats()["used_bytes"] - base >= 2 * nbytes
    del a, b
    stats = buffers.cache_stats()
    assert stats["used_bytes"] == base
    assert stats["peak_used_bytes"] >= base + 2 * nbytes
    assert stats["reserved_bytes"] >= 2 * nbytes  # free mappings stay with the process for reuse
