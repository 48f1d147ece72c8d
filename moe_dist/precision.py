"""Precision policy: which dtype parameters are stored in, which one the forward computes in, and which one
sums (router math, the gate-weighted combine, losses, gradient norms).

``trainer.precision``:
- ``fp32``: everything in float32;
- ``bf16``: float32 parameters, gradients and optimizer; the forward computes in bfloat16 (autocast for the
  native and DeepSpeed engines, FSDP2's ``MixedPrecisionPolicy`` for fsdp); router and combine in float32;
- ``fp64``: everything in float64, a verification mode (equivalence to 1e-9 instead of to float32 noise);
- ``auto``: bf16 on CUDA, fp32 elsewhere.

Sums run in ``accum_dtype``: float64 when the tensors are float64, else float32. Code that means "sum in full
precision" uses it instead of a hard-coded ``.float()``, so that fp64 mode stays float64 end to end.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from moe_dist.config import PRECISIONS


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; any other value as it is."""
    assert precision in PRECISIONS, precision
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def param_dtype(precision: str) -> torch.dtype:
    """The dtype parameters, gradients and optimizer state are stored in (bf16 keeps float32 masters)."""
    return torch.float64 if precision == "fp64" else torch.float32


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32 (also for bf16 / fp16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """bf16 autocast on ``device`` for precision ``bf16``; a disabled (no-op) context otherwise."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(device: torch.device | str) -> AbstractContextManager:
    """Autocast switched off: ops inside run in the dtype of their inputs (router math, combine)."""
    return torch.autocast(torch.device(device).type, enabled=False)
