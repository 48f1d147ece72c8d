"""Host → device copies that never block the host.

On CUDA a copy from ordinary (pageable) host memory makes the host wait for the device; from pinned memory
with ``non_blocking=True`` it is queued like a kernel. Index tensors built on the host (split sizes, row
orders) and the training batches go through here. On CPU the host tensor is the device tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, copied from pinned memory without blocking the host on CUDA."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        # The pinned buffer returns to torch's host cache only after the copy has run (it records the stream).
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def int_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of host integers on ``device`` (see ``to_device``)."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)
