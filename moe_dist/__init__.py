"""moe_dist: expert-parallel x data-parallel Mixture-of-Experts training.

The public names below are imported on first use, not with the package: ``python -m moe_dist.plan`` must load
its fake-CUDA shim before the first ``import torch`` (see moe_dist/planning/fake_cuda.py).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MoEConfig": "moe_dist.config",
    "MoELayer": "moe_dist.moe.layer",
    "clip_gradients_": "moe_dist.parallel.apply",
    "global_grad_norm": "moe_dist.parallel.apply",
    "parallelize_moe": "moe_dist.parallel.apply",
    "sync_gradients": "moe_dist.parallel.apply",
    "Mesh": "moe_dist.parallel.mesh",
    "build_mesh": "moe_dist.parallel.mesh",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_dist' has no attribute {name!r}")
