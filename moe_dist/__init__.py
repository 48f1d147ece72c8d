"""moe_dist: expert-parallel x data-parallel Mixture-of-Experts training."""

from moe_dist.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.apply import parallelize_moe, sync_gradients
from moe_dist.parallel.mesh import Mesh, build_mesh

__all__ = ["Mesh", "MoEConfig", "MoELayer", "build_mesh", "parallelize_moe", "sync_gradients"]
