"""Token dispatch and combine: a mirrored pair around the grouped experts.

Legend: T tokens on this rank, K experts per token, N = T·K token copies, D model dim, E global experts,
L = E / ep local experts, R rows received from the EP group, P = ep ranks.

dispatch: sort the N copies by expert (capacity drops here) → exchange counts → all_to_all rows with
          uneven splits → reorder the received rows from (source rank, local expert) to expert-major.
combine:  the exact reverse, then Σ_k gate·y into fp32 rows with one index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, *, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, dim=0) - x


def segment_index(src_starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Gather index that lays segments [src_starts[i], src_starts[i] + lengths[i]) end to end.

    ``total`` = lengths.sum() comes from the host, so no device sync is needed for the output size.
    """
    dst_starts = exclusive_cumsum(lengths)
    shift = torch.repeat_interleave(src_starts - dst_starts, lengths, output_size=total)
    return shift + torch.arange(total, device=lengths.device)


def sort_copies_by_expert(
    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, *, by_gate: bool
) -> torch.Tensor:
    """Order of the N token copies sorted by expert id (stable).

    With ``by_gate`` the copies of each expert are in descending gate weight, so that a capacity cut keeps
    the highest-priority copies.
    """
    ids_N = expert_ids_TK.reshape(-1)
    if not by_gate:
        return torch.sort(ids_N, stable=True).indices
    by_weight = torch.sort(weights_TK.detach().reshape(-1), descending=True, stable=True).indices
    return by_weight[torch.sort(ids_N[by_weight], stable=True).indices]


@dataclass
class DispatchState:
    """Everything combine needs to undo dispatch."""

    num_tokens: int
    token_idx_M: torch.Tensor  # token row of each kept copy, in sorted (expert-major) order
    weights_M: torch.Tensor  # fp32 gate weight of each kept copy, same order
    send_splits: list[int] | None  # rows sent to each EP rank (None: no exchange)
    recv_splits: list[int] | None
    to_src_major_R: torch.Tensor | None  # inverse of the received-row reorder (None: no reorder)


@dataclass
class Dispatched:
    x_RD: torch.Tensor  # expert-major rows for the local experts
    tokens_per_expert_L: torch.Tensor  # int64 on device
    tokens_per_expert_host: list[int] | None  # same on the host when a sync already happened
    num_dropped: int | None  # copies dropped by capacity on this rank (None when dropless)
    state: DispatchState


class TokenDispatcher:
    """Sort-based, padding-free dispatch over an expert-parallel group (or locally when ep == 1)."""

    def __init__(self, num_experts: int, *, group: dist.ProcessGroup | None = None, ep: int = 1):
        assert num_experts % ep == 0
        self.num_experts, self.group, self.ep = num_experts, group, ep
        self.num_local = num_experts // ep

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        counts_E: torch.Tensor,
        *,
        capacity: int | None,
    ) -> Dispatched:
        T, K = expert_ids_TK.shape
        order_N = sort_copies_by_expert(expert_ids_TK, weights_TK, by_gate=capacity is not None)
        kept_E = counts_E if capacity is None else counts_E.clamp(max=capacity)

        recv_counts_PL = None
        if self.group is not None:
            recv_counts_PL = torch.empty_like(kept_E)
            dist.all_to_all_single(recv_counts_PL, kept_E, group=self.group)
        host = None
        if self.group is not None or capacity is not None:
            # The layer's one device-to-host sync: split sizes (and the kept-row count) must be on the host.
            both = kept_E if recv_counts_PL is None else torch.cat([kept_E, recv_counts_PL])
            host = both.tolist()

        num_kept = T * K
        if capacity is not None:
            num_kept = sum(host[: self.num_experts])
            order_N = order_N[segment_index(exclusive_cumsum(counts_E), kept_E, num_kept)]
        token_idx_M = order_N // K
        weights_M = weights_TK.reshape(-1)[order_N].float()
        x_MD = x_TD[token_idx_M]

        state = DispatchState(T, token_idx_M, weights_M, None, None, None)
        num_dropped = None if capacity is None else T * K - num_kept
        if self.group is None:
            host_counts = host[: self.num_experts] if host is not None else None
            return Dispatched(x_MD, kept_E, host_counts, num_dropped, state)

        L, P = self.num_local, self.ep
        recv_host = host[self.num_experts :]
        state.send_splits = [sum(host[p * L : (p + 1) * L]) for p in range(P)]
        state.recv_splits = [sum(recv_host[p * L : (p + 1) * L]) for p in range(P)]
        x_RD = all_to_all(x_MD, out_splits=state.recv_splits, in_splits=state.send_splits, group=self.group)
        # Received rows are ordered (source rank, local expert); the experts want (local expert, source rank).
        tokens_per_expert_host = [sum(recv_host[p * L + e] for p in range(P)) for e in range(L)]
        tokens_per_expert_L = recv_counts_PL.view(P, L).sum(dim=0)
        if L > 1:
            R = x_RD.shape[0]
            src_starts_PL = exclusive_cumsum(recv_counts_PL).view(P, L)
            to_expert_major = segment_index(
                src_starts_PL.t().reshape(-1), recv_counts_PL.view(P, L).t().reshape(-1), R
            )
            state.to_src_major_R = torch.empty_like(to_expert_major)
            state.to_src_major_R[to_expert_major] = torch.arange(R, device=x_RD.device)
            x_RD = x_RD[to_expert_major]
        return Dispatched(x_RD, tokens_per_expert_L, tokens_per_expert_host, num_dropped, state)

    def combine(self, y_RD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Reverse of dispatch; returns fp32 rows [T, D] = Σ over kept copies of gate · expert output."""
        if state.to_src_major_R is not None:
            y_RD = y_RD[state.to_src_major_R]
        if self.group is not None:
            y_RD = all_to_all(
                y_RD, out_splits=state.send_splits, in_splits=state.recv_splits, group=self.group
            )
        out_TD = y_RD.new_zeros((state.num_tokens, y_RD.shape[-1]), dtype=torch.float32)
        return out_TD.index_add(0, state.token_idx_M, y_RD.float() * state.weights_M.unsqueeze(-1))
