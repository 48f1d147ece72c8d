"""moe_dist: expert-parallel x data-parallel Mixture-of-Experts training."""

from moe_dist.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.apply import clip_gradients_, global_grad_norm, parallelize_moe, sync_gradients
from moe_dist.parallel.mesh import Mesh, build_mesh

__all__ = [
    "Mesh",
    "MoEConfig",
    "MoELayer",
    "build_mesh",
    "clip_gradients_",
    "global_grad_norm",
    "parallelize_moe",
    "sync_gradients",
]
