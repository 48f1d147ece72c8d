"""Grouped SwiGLU experts with stacked weights, reading their rows where the exchange put them.

Legend: R rows handed to the experts, D model dim, F expert hidden dim, L local experts, P source ranks.
Weights: ``w_gate_up`` [L, D, 2F] (gate and up projections fused along the last dim), ``w_down`` [L, F, D].

Row order: rows arrive from the all-to-all ordered by (source rank, local expert); ``ExpertRows`` says
where each (source, expert) segment lies. The per-expert loop (CPU default) reads and writes the segments
in place; ``grouped_mm`` (CUDA default) needs expert-major rows and reorders them with one gather each way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moe_dist.moe.buffers import new_rows
from moe_dist.moe.dispatch import ExpertRows
from moe_dist.transfer import to_device

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _pairs(segments: list[tuple[int, int]]) -> Iterator[tuple[slice, slice]]:
    """(rows in the segmented buffer, rows in the expert's dense buffer) for each segment."""
    offset = 0
    for start, n in segments:
        yield slice(start, start + n), slice(offset, offset + n)
        offset += n


def _expert_rows(rows_RX: torch.Tensor, segments: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Per local expert, its block of an expert-major buffer (as many rows as its segments hold)."""
    blocks, start = [], 0
    for segs in segments:
        n = sum(m for _, m in segs)
        blocks.append(rows_RX[start : start + n])
        start += n
    return blocks


def _sum_tn(a: torch.Tensor, a_rows, b: torch.Tensor, b_rows, *, out: torch.Tensor) -> None:
    """out = Σ over segments of a[rows]ᵀ @ b[rows] (a weight gradient; summed segment by segment)."""
    for i, (ra, rb) in enumerate(zip(a_rows, b_rows)):
        if i == 0:
            torch.mm(a[ra].t(), b[rb], out=out)
        else:
            out.addmm_(a[ra].t(), b[rb])


class _SegmentSwiGLU(torch.autograd.Function):
    """SwiGLU experts that read their input rows from, and write their output rows to, the segments where
    the exchange put them: each projection runs per segment into a slice of one buffer (``out=``), so the
    (source rank, local expert) order needs no reorder copy in either direction. Backward is written out:
    it keeps only the gate/up rows (one expert-major buffer) and recomputes silu(gate)·up from them."""

    @staticmethod
    def forward(ctx, x_RD, w_gate_up, w_down, segments):
        hidden = w_down.shape[1]
        y_RD = new_rows(x_RD, (x_RD.shape[0], w_down.shape[2]))
        h_R2F = new_rows(x_RD, (x_RD.shape[0], 2 * hidden))  # gate/up rows, expert-major, kept for backward
        for expert, (segs, h_n2F) in enumerate(zip(segments, _expert_rows(h_R2F, segments))):
            if not segs:
                continue
            for rows, dense in _pairs(segs):
                torch.mm(x_RD[rows], w_gate_up[expert], out=h_n2F[dense])
            act_nF = F.silu(h_n2F[:, :hidden]).mul_(h_n2F[:, hidden:])
            for rows, dense in _pairs(segs):
                torch.mm(act_nF[dense], w_down[expert], out=y_RD[rows])
        ctx.segments = segments
        ctx.save_for_backward(x_RD, w_gate_up, w_down, h_R2F)
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, w_gate_up, w_down, h_R2F = ctx.saved_tensors
        hidden = w_down.shape[1]
        dy_RD = grad_y_RD.contiguous()
        dx_RD = new_rows(x_RD, x_RD.shape)  # every row belongs to one segment, so every row is written
        dw_gate_up, dw_down = torch.empty_like(w_gate_up), torch.empty_like(w_down)
        for expert, (segs, h_n2F) in enumerate(zip(ctx.segments, _expert_rows(h_R2F, ctx.segments))):
            if not segs:
                dw_gate_up[expert].zero_()
                dw_down[expert].zero_()
                continue
            gate_nF, up_nF = h_n2F[:, :hidden], h_n2F[:, hidden:]
            silu_nF = F.silu(gate_nF)
            rows = [r for r, _ in _pairs(segs)]
            dense = [d for _, d in _pairs(segs)]
            _sum_tn(silu_nF * up_nF, dense, dy_RD, rows, out=dw_down[expert])
            d_act_nF = torch.empty_like(silu_nF)
            for r, d in zip(rows, dense):
                torch.mm(dy_RD[r], w_down[expert].t(), out=d_act_nF[d])
            dh_n2F = torch.empty_like(h_n2F)
            torch.ops.aten.silu_backward.grad_input(d_act_nF * up_nF, gate_nF, grad_input=dh_n2F[:, :hidden])
            torch.mul(d_act_nF, silu_nF, out=dh_n2F[:, hidden:])
            _sum_tn(x_RD, rows, dh_n2F, dense, out=dw_gate_up[expert])
            for r, d in zip(rows, dense):
                torch.mm(dh_n2F[d], w_gate_up[expert].t(), out=dx_RD[r])
        return dx_RD, dw_gate_up, dw_down, None


def _contiguous_grad(y: torch.Tensor) -> torch.Tensor:
    """``y``, whose incoming gradient is made contiguous (grouped_mm's backward needs it). A tensor hook, not an
    identity autograd Function: that returns a view, and FSDP2 warns on a module output that is a view (an
    in-place op on it would skip FSDP2's pre-backward hook; moe_dist.plan showed the warning under fsdp)."""
    if y.requires_grad:
        y.register_hook(torch.Tensor.contiguous)
    return y


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

    def forward(self, x_RD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        """Expert outputs [R, D], row for row in the order of ``x_RD`` (described by ``rows``)."""
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
        if not self.uses_grouped_mm(dtype, x_RD.device):
            return _SegmentSwiGLU.apply(x_RD, w_gate_up, w_down, rows.segments())
        order_R = rows.expert_major_order()
        if order_R is not None:  # (source, expert) → expert-major: one gather here, one scatter back
            order_R = to_device(order_R, x_RD.device)
            x_RD = x_RD.index_select(0, order_R)
        offsets_L = torch.cumsum(rows.tokens_per_expert(x_RD.device), dim=0, dtype=torch.int32)
        h_R2F = F.grouped_mm(x_RD, w_gate_up, offs=offsets_L)
        gate, up = h_R2F.chunk(2, dim=-1)
        y_RD = _contiguous_grad(F.grouped_mm(F.silu(gate) * up, w_down, offs=offsets_L))
        if order_R is not None:
            y_RD = y_RD.new_empty(y_RD.shape).index_copy(0, order_R, y_RD)
        return y_RD
