"""moe_dist: expert-parallel x data-parallel Mixture-of-Experts training.

The public names below are imported on first use, so that torch-free tools (``python -m moe_dist.prepare``
and its worker processes) start without importing torch, and ``python -m moe_dist.plan`` can load its
fake-CUDA shim before the first ``import torch`` (see moe_dist/planning/fake_cuda.py).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Mesh": "moe_dist.parallel.mesh",
    "MoEConfig": "moe_dist.config",
    "MoELayer": "moe_dist.moe.layer",
    "build_mesh": "moe_dist.parallel.mesh",
    "clip_gradients_": "moe_dist.parallel.apply",
    "global_grad_norm": "moe_dist.parallel.apply",
    "parallelize_moe": "moe_dist.parallel.apply",
    "sync_gradients": "moe_dist.parallel.apply",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_dist' has no attribute {name!r}")
