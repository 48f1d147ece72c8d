"""The edp x ep process mesh.

Rank layout: ``rank = edp_rank * ep + ep_rank``. Consecutive ranks form one expert-parallel (EP) group, so
with ``ep <= GPUs per node`` the all-to-all stays inside a node. Ranks with the same ``ep_rank`` hold the
same expert shard and form an expert-data-parallel (EDP) group. Dense parameters are replicated on all
ranks (the world group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_dist.config import validate_layout


@dataclass(frozen=True)
class Mesh:
    world_size: int
    rank: int
    ep: int
    edp: int
    ep_rank: int
    edp_rank: int
    world_group: dist.ProcessGroup | None  # None when world_size == 1
    ep_group: dist.ProcessGroup | None  # None when ep == 1: no expert communication at all
    edp_group: dist.ProcessGroup | None  # None when edp == 1
    device_mesh: DeviceMesh | None = None  # the same (edp, ep) layout for DTensor / checkpoints

    @property
    def ep_ranks(self) -> list[int]:
        return [self.edp_rank * self.ep + i for i in range(self.ep)]

    def expert_shard(self, num_experts: int) -> tuple[int, int]:
        """(first global expert, number of experts) held by this rank."""
        num_local = num_experts // self.ep
        return self.ep_rank * num_local, num_local


def single_process_mesh() -> Mesh:
    return Mesh(
        world_size=1,
        rank=0,
        ep=1,
        edp=1,
        ep_rank=0,
        edp_rank=0,
        world_group=None,
        ep_group=None,
        edp_group=None,
    )


def build_mesh(*, ep: int, num_experts: int = 0, device_type: str | None = None) -> Mesh:
    """Builds the mesh over the default process group (or a one-rank mesh when there is none).

    The layout is validated before any group is created, so a bad ``ep`` fails with a ValueError on every
    rank instead of hanging in a collective. The groups come from one torch DeviceMesh of shape (edp, ep),
    whose row-major rank order is the layout above; its device type is ``device_type`` (default: cuda under
    NCCL, else cpu; the planner's fake process group stands for NCCL ranks and passes "cuda").
    """
    if not dist.is_initialized():
        validate_layout(world_size=1, ep=ep, num_experts=num_experts)
        return single_process_mesh()
    world, rank = dist.get_world_size(), dist.get_rank()
    validate_layout(world_size=world, ep=ep, num_experts=num_experts)
    edp = world // ep
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    device_mesh = init_device_mesh(device_type, (edp, ep), mesh_dim_names=("edp", "ep"))
    return Mesh(
        world_size=world,
        rank=rank,
        ep=ep,
        edp=edp,
        ep_rank=rank % ep,
        edp_rank=rank // ep,
        world_group=dist.group.WORLD,
        ep_group=device_mesh.get_group("ep") if ep > 1 else None,
        edp_group=device_mesh.get_group("edp") if edp > 1 else None,
        device_mesh=device_mesh,
    )
