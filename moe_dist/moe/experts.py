"""Grouped SwiGLU experts with stacked weights.

Legend: R expert-major rows, D model dim, F expert hidden dim, L local experts.
Weights: ``w_gate_up`` [L, D, 2F] (gate and up projections fused along the last dim), ``w_down`` [L, F, D].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, *, grouped_mm: str = "auto"):
        super().__init__()
        self.dim, self.hidden, self.grouped_mm = dim, hidden, grouped_mm
        self.num_global_experts = num_experts
        self.expert_offset = 0  # global id of local expert 0 (set by parallelize_moe)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    @property
    def num_local_experts(self) -> int:
        return self.w_gate_up.shape[0]

    def uses_grouped_mm(self, dtype: torch.dtype, device: torch.device) -> bool:
        """ "auto": grouped_mm on CUDA only. On CPU it is one plain mm per expert behind a larger allocation,
        and measured 21% slower than the loop on bench config A (docs/PERFORMANCE.md)."""
        if self.grouped_mm == "off" or not HAS_GROUPED_MM:
            return False
        if self.grouped_mm == "auto" and device.type != "cuda":
            return False
        if device.type == "cuda" and dtype != torch.bfloat16:
            # torch's CUDA grouped_mm takes bf16 only ("Expected inputs of BF16 type"): fp32 / fp64 loop.
            if self.grouped_mm == "on":
                raise ValueError(f"model.moe.grouped_mm='on': CUDA grouped_mm needs bf16 inputs, got {dtype}")
            return False
        # grouped_mm needs every row stride to be a multiple of 16 bytes.
        itemsize = torch.empty((), dtype=dtype).element_size()
        aligned = (self.dim * itemsize) % 16 == 0 and (self.hidden * itemsize) % 16 == 0
        if self.grouped_mm == "on" and not aligned:
            raise ValueError(
                f"model.moe.grouped_mm='on': dim={self.dim} and expert_hidden={self.hidden} must be multiples "
                f"of {16 // itemsize} for {dtype}"
            )
        return aligned

    def forward(
        self,
        x_RD: torch.Tensor,
        tokens_per_expert_L: torch.Tensor,
        tokens_per_expert_host: list[int] | None = None,
        *,
        to_host: Callable[[torch.Tensor], list[int]] = torch.Tensor.tolist,
    ) -> torch.Tensor:
        dtype = (
            torch.get_autocast_dtype(x_RD.device.type)
            if torch.is_autocast_enabled(x_RD.device.type)
            else None
        )
        dtype = dtype or self.w_gate_up.dtype
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if isinstance(w_gate_up, DTensor):  # engine=fsdp: gathered, a DTensor of this EP rank's L experts
            w_gate_up, w_down = w_gate_up.to_local(), w_down.to_local()
        x_RD, w_gate_up, w_down = x_RD.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        if self.uses_grouped_mm(dtype, x_RD.device):
            offsets_L = torch.cumsum(tokens_per_expert_L, dim=0, dtype=torch.int32)
            h_R2F = F.grouped_mm(x_RD, w_gate_up, offs=offsets_L)
            gate, up = h_R2F.chunk(2, dim=-1)
            y_RD = F.grouped_mm(F.silu(gate) * up, w_down, offs=offsets_L)
            return _ContiguousGrad.apply(y_RD)
        if tokens_per_expert_host is None:
            tokens_per_expert_host = to_host(tokens_per_expert_L)  # host sync: the loop needs the split sizes
        outs = []
        for e, x_D in enumerate(torch.split(x_RD, tokens_per_expert_host)):
            gate, up = (x_D @ w_gate_up[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ w_down[e])
        return torch.cat(outs) if outs else x_RD.new_zeros((0, self.dim))
