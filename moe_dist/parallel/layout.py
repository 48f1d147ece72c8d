"""The global layout that checkpoints hold: every tensor in its full, unsharded shape, of which each rank
hands over only the pieces it holds, never a gathered copy.

Three forms of a rank's share, all aliasing live storage (so a checkpoint load fills them in place):
- a plain ``torch.Tensor``: the whole tensor, identical on every rank that holds it (DCP writes one copy);
- a ``DTensor``: sharded over a device mesh (experts over ``ep``; FSDP2 parameters and optimizer state);
- ``Fragments``: arbitrary rectangular pieces, e.g. a ZeRO-1/2 rank's contiguous range of a parameter's
  flattened elements, cut into boxes by ``flat_range_boxes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_dist.parallel.mesh import Mesh

Offsets = tuple[int, ...]
Box = tuple[Offsets, tuple[int, ...]]  # (offsets, sizes) in the global tensor


@dataclass
class Fragments:
    """The pieces of one global tensor that this rank holds (possibly none): (global offsets, tensor)."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[tuple[Offsets, torch.Tensor]] = field(default_factory=list)

    def numel(self) -> int:
        return sum(t.numel() for _, t in self.pieces)


GlobalTensor = torch.Tensor | DTensor | Fragments


def pieces_of(value: GlobalTensor) -> tuple[tuple[int, ...], list[tuple[Offsets, torch.Tensor]]]:
    """(global shape, [(offsets, tensor)]) of what this rank holds of ``value`` (nothing for a DTensor whose mesh
    this rank is not part of)."""
    if isinstance(value, Fragments):
        return tuple(value.global_shape), list(value.pieces)
    if isinstance(value, DTensor):
        if value.device_mesh.get_coordinate() is None:
            return tuple(value.shape), []
        (chunk,) = value.__create_chunk_list__()  # the local shard's place in the global tensor
        return tuple(value.shape), [(tuple(chunk.offsets), value.to_local())]
    return tuple(value.shape), [((0,) * value.dim(), value)]


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Rectangular boxes that tile the elements [start, stop) of a row-major tensor of ``shape``, in order.

    Each box fixes a prefix of indices, spans a range of the next dim and all later dims in full, so it is
    contiguous in the flat order: at most 2·ndim − 1 boxes.
    """
    assert 0 <= start <= stop <= math.prod(shape), (shape, start, stop)
    if start == stop:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [
            ((first, *offsets), (1, *sizes))
            for offsets, sizes in flat_range_boxes(shape[1:], start - first * inner, stop - first * inner)
        ]
    boxes: list[Box] = []
    full_from, full_to = first, last + 1
    if start % inner:
        boxes += flat_range_boxes(shape, start, (first + 1) * inner)
        full_from = first + 1
    tail: list[Box] = []
    if stop % inner:
        tail = flat_range_boxes(shape, last * inner, stop)
        full_to = last
    if full_from < full_to:
        boxes.append(((full_from, *(0 for _ in shape[1:])), (full_to - full_from, *shape[1:])))
    return boxes + tail


def flat_fragment(
    flat: torch.Tensor,
    *,
    local_shape: tuple[int, ...],
    start: int,
    global_shape: tuple[int, ...],
    dim0_offset: int = 0,
) -> Fragments:
    """``flat`` (1-D) holds elements [start, start + flat.numel()) of a local tensor of ``local_shape``, which is
    rows [dim0_offset, …) of the global tensor; returns its boxes as views of ``flat``."""
    pieces, consumed = [], 0
    for offsets, sizes in flat_range_boxes(local_shape, start, start + flat.numel()):
        numel = math.prod(sizes)
        view = flat.narrow(0, consumed, numel).view(sizes)
        pieces.append(((offsets[0] + dim0_offset, *offsets[1:]) if offsets else offsets, view))
        consumed += numel
    assert consumed == flat.numel()
    return Fragments(global_shape=tuple(global_shape), dtype=flat.dtype, pieces=pieces)


def expert_dtensor(local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """An expert tensor (this rank's EP shard on dim 0) as a DTensor over (edp, ep): replicated over edp,
    sharded over ep. Plain when there is nothing to shard; a DTensor (an FSDP2 engine's parameters and slots)
    as it is: its placements already give the global layout."""
    if isinstance(local, DTensor) or mesh.device_mesh is None or mesh.ep == 1 or local.dim() == 0:
        return local
    return DTensor.from_local(local, mesh.device_mesh, [Replicate(), Shard(0)], run_check=False)
