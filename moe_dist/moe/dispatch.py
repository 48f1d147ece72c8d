"""Token dispatch and combine: a mirrored pair around the grouped experts.

Legend: T tokens on this rank, K experts per token, N = T·K token copies, D model dim, E global experts,
L = E / ep local experts, R rows received from the EP group, P = ep ranks.

dispatch: sort the N copies by expert (capacity drops here) → exchange counts → all_to_all rows with
          uneven splits → reorder the received rows from (source rank, local expert) to expert-major.
combine:  the exact reverse, then Σ_k gate·y into fp32 rows (fp64 in fp64 mode) with one index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from moe_dist.distributed import to_device
from moe_dist.precision import accum_dtype


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


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Plan:
    """Sorted token copies and every count the exchange needs (host lists from the one sync)."""

    num_tokens: int
    token_idx_M: torch.Tensor  # token row of each kept copy, in sorted (expert-major) order
    weights_M: torch.Tensor  # gate weight of each kept copy (fp32; fp64 in fp64 mode), same order
    x_MD: torch.Tensor  # the kept copies, same order
    kept_E: torch.Tensor  # kept copies per global expert on this rank (device)
    counts_PE: list[list[int]] | None  # kept copies per (EP rank, global expert) in the EP group (host)
    counts_PE_device: torch.Tensor | None  # the same [ep, E] on the device (the all-gather's output)
    kept_host: list[int] | None  # this rank's row of counts_PE (host), when a sync happened
    num_dropped: int | None  # None when dropless


@dataclass
class RoundState:
    """One exchange round: what combine needs to send expert outputs back."""

    send_splits: list[int]
    recv_splits: list[int]
    to_src_major_R: torch.Tensor | None  # inverse of the received-row reorder (None: no reorder)


@dataclass
class Dispatched:
    x_RD: torch.Tensor  # expert-major rows for the local experts
    tokens_per_expert_L: torch.Tensor  # int64 on device
    tokens_per_expert_host: list[int] | None  # same on the host when a sync already happened
    num_dropped: int | None  # copies dropped by capacity on this rank (None when dropless)
    plan: Plan
    round: RoundState | None  # None when ep == 1 (no exchange)


class TokenDispatcher:
    """Sort-based, padding-free dispatch over an expert-parallel group (or locally when ep == 1).

    With ``recv_budget`` (rows), a step whose routing would make some rank receive more rows than the budget
    runs the exchange and the expert compute in rounds, each recomputed in backward (activation
    checkpointing), so the receive-side activations stay bounded while routing stays dropless.
    """

    def __init__(
        self,
        num_experts: int,
        *,
        group: dist.ProcessGroup | None = None,
        ep: int = 1,
        recv_budget: int | None = None,
    ):
        assert num_experts % ep == 0
        self.num_experts, self.group, self.ep = num_experts, group, ep
        self.num_local = num_experts // ep
        self.recv_budget = recv_budget
        self.ep_rank = dist.get_rank(group) if group is not None else 0

    def counts_to_host(self, counts: torch.Tensor) -> list[int]:
        """The layer's one device-to-host sync: expert counts ([E], or all-gathered [ep·E]) as a host list.

        A seam: the planner (moe_dist.plan, fake tensors without data) replaces it per dispatcher with the
        routing it plans for (uniform or skewed); training never touches it.
        """
        return counts.tolist()

    def plan(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        counts_E: torch.Tensor,
        *,
        capacity: int | None,
    ) -> Plan:
        T, K = expert_ids_TK.shape
        order_N = sort_copies_by_expert(expert_ids_TK, weights_TK, by_gate=capacity is not None)
        kept_E = counts_E if capacity is None else counts_E.clamp(max=capacity)
        counts_PE = kept_host = counts_PE_device = None
        if self.group is not None:
            gathered = kept_E.new_empty(self.ep * self.num_experts)
            _all_gather(gathered, kept_E, group=self.group)
            counts_PE_device = gathered.view(self.ep, self.num_experts)
            # The layer's one device-to-host sync: split sizes must be known on the host.
            flat = self.counts_to_host(gathered)
            counts_PE = [flat[p * self.num_experts : (p + 1) * self.num_experts] for p in range(self.ep)]
            kept_host = counts_PE[self.ep_rank]
        elif capacity is not None:
            kept_host = self.counts_to_host(
                kept_E
            )  # the one sync: the number of kept rows sizes the gathers below
        num_kept = T * K
        if capacity is not None:
            num_kept = sum(kept_host)
            order_N = order_N[segment_index(exclusive_cumsum(counts_E), kept_E, num_kept)]
        token_idx_M = order_N // K
        return Plan(
            num_tokens=T,
            token_idx_M=token_idx_M,
            weights_M=weights_TK.reshape(-1)[order_N].to(accum_dtype(weights_TK)),
            x_MD=x_TD.index_select(0, token_idx_M),
            kept_E=kept_E,
            counts_PE=counts_PE,
            counts_PE_device=counts_PE_device,
            kept_host=kept_host,
            num_dropped=None if capacity is None else T * K - num_kept,
        )

    def num_rounds(self, plan: Plan) -> int:
        """Rounds needed so that no rank receives more than recv_budget rows in one round.

        Every rank computes the same number from the gathered counts, so no further collective is needed.
        """
        if self.recv_budget is None or plan.counts_PE is None:
            return 1
        L = self.num_local
        most = max(sum(sum(row[q * L : (q + 1) * L]) for row in plan.counts_PE) for q in range(self.ep))
        return max(1, -(-most // self.recv_budget))

    def _round_pieces(self, plan: Plan, rounds: int, r: int) -> tuple[list[list[int]], list[int]]:
        """Round r's kept copies per (EP rank, global expert), and this rank's offset into each expert segment.

        Each receiver's incoming rows, in (source rank, local expert) order, are cut into windows of
        recv_budget rows; round r exchanges window r of every receiver.
        """
        if rounds == 1:
            return plan.counts_PE, [0] * self.num_experts
        L, budget = self.num_local, self.recv_budget
        window = (r * budget, (r + 1) * budget)
        counts_PE = [[0] * self.num_experts for _ in range(self.ep)]
        offsets_E = [0] * self.num_experts
        for q in range(self.ep):
            position = 0  # where the next segment starts in receiver q's incoming stream
            for p in range(self.ep):
                for e in range(q * L, (q + 1) * L):
                    n = plan.counts_PE[p][e]
                    lo, hi = max(position, window[0]), min(position + n, window[1])
                    if hi > lo:
                        counts_PE[p][e] = hi - lo
                        if p == self.ep_rank:
                            offsets_E[e] = lo - position
                    position += n
        return counts_PE, offsets_E

    def received_rows_per_round(self, plan: Plan, rounds: int) -> int | None:
        """Peak rows this rank received in one round (None without an exchange): what the budget bounds."""
        if plan.counts_PE is None:
            return None
        L, me = self.num_local, self.ep_rank
        return max(
            sum(sum(row[me * L : (me + 1) * L]) for row in self._round_pieces(plan, rounds, r)[0])
            for r in range(rounds)
        )

    def exchange_in(
        self, x_MD: torch.Tensor, counts_PE: list[list[int]], counts_PE_device: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoundState, list[int], torch.Tensor]:
        """Sends rows to the ranks owning their experts; returns expert-major received rows and the rows per
        local expert (host and device). ``counts_PE_device``: ``counts_PE`` already on the device (else copied
        there asynchronously)."""
        L, P, me = self.num_local, self.ep, self.ep_rank
        send_splits = [sum(counts_PE[me][q * L : (q + 1) * L]) for q in range(P)]
        recv_PL = [counts_PE[p][me * L : (me + 1) * L] for p in range(P)]
        recv_splits = [sum(row) for row in recv_PL]
        x_RD = all_to_all(x_MD, out_splits=recv_splits, in_splits=send_splits, group=self.group)
        tokens_per_expert = [sum(recv_PL[p][e] for p in range(P)) for e in range(L)]
        if counts_PE_device is not None:
            lengths_PL = counts_PE_device[:, me * L : (me + 1) * L].to(torch.int64)
        else:
            lengths_PL = to_device(torch.tensor(recv_PL, dtype=torch.int64).view(P, L), x_RD.device)
        state = RoundState(send_splits, recv_splits, None)
        if L > 1:
            # Received rows are ordered (source rank, local expert); the experts want (local expert, source).
            src_starts_PL = exclusive_cumsum(lengths_PL.reshape(-1)).view(P, L)
            R = x_RD.shape[0]
            to_expert_major = segment_index(src_starts_PL.t().reshape(-1), lengths_PL.t().reshape(-1), R)
            state.to_src_major_R = torch.empty_like(to_expert_major)
            state.to_src_major_R[to_expert_major] = torch.arange(R, device=x_RD.device)
            x_RD = x_RD.index_select(0, to_expert_major)
        return x_RD, state, tokens_per_expert, lengths_PL.sum(dim=0)

    def exchange_out(self, y_RD: torch.Tensor, state: RoundState) -> torch.Tensor:
        """Reverse of exchange_in: expert outputs back to the ranks (and row order) they came from."""
        if state.to_src_major_R is not None:
            y_RD = y_RD.index_select(0, state.to_src_major_R)
        return all_to_all(y_RD, out_splits=state.send_splits, in_splits=state.recv_splits, group=self.group)

    def dispatch(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        counts_E: torch.Tensor,
        *,
        capacity: int | None,
    ) -> Dispatched:
        """Plan and exchange in one round (ignores recv_budget; see ``forward`` for the budgeted path)."""
        return self._exchange_all(self.plan(x_TD, expert_ids_TK, weights_TK, counts_E, capacity=capacity))

    def _exchange_all(self, plan: Plan) -> Dispatched:
        if self.group is None:
            return Dispatched(plan.x_MD, plan.kept_E, plan.kept_host, plan.num_dropped, plan, None)
        x_RD, state, tokens_host, tokens_dev = self.exchange_in(
            plan.x_MD, plan.counts_PE, plan.counts_PE_device
        )
        return Dispatched(x_RD, tokens_dev, tokens_host, plan.num_dropped, plan, state)

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """Reverse of dispatch; returns rows [T, D] = Σ over kept copies of gate · expert output, summed in the
        gate weights' dtype (fp32; fp64 in fp64 mode)."""
        if dispatched.round is not None:
            y_RD = self.exchange_out(y_RD, dispatched.round)
        return self._weighted_sum(
            y_RD, dispatched.plan, dispatched.plan.token_idx_M, dispatched.plan.weights_M
        )

    @staticmethod
    def _weighted_sum(y_MD, plan: Plan, token_idx_M, weights_M) -> torch.Tensor:
        out_TD = y_MD.new_zeros((plan.num_tokens, y_MD.shape[-1]), dtype=weights_M.dtype)
        return out_TD.index_add(0, token_idx_M, y_MD.to(weights_M.dtype) * weights_M.unsqueeze(-1))

    def forward(
        self, x_TD, expert_ids_TK, weights_TK, counts_E, *, capacity, experts
    ) -> tuple[torch.Tensor, Plan, int]:
        """route-result → output rows [T, D] (gate weights' dtype), the plan, and the exchange rounds used."""
        plan = self.plan(x_TD, expert_ids_TK, weights_TK, counts_E, capacity=capacity)
        rounds = self.num_rounds(plan)
        if rounds == 1:
            d = self._exchange_all(plan)
            y_RD = experts(
                d.x_RD, d.tokens_per_expert_L, d.tokens_per_expert_host, to_host=self.counts_to_host
            )
            return self.combine(y_RD, d), plan, 1

        out_TD = x_TD.new_zeros((plan.num_tokens, x_TD.shape[-1]), dtype=plan.weights_M.dtype)
        starts_E = exclusive_cumsum(plan.kept_E)
        for r in range(rounds):
            counts_PE, offsets = self._round_pieces(plan, rounds, r)
            lengths = counts_PE[self.ep_rank]
            offsets_lengths = to_device(torch.tensor([offsets, lengths], dtype=torch.int64), starts_E.device)
            rows = segment_index(starts_E + offsets_lengths[0], offsets_lengths[1], sum(lengths))

            def one_round(x_MD, counts_PE=counts_PE):
                x_RD, state, tokens_host, tokens_dev = self.exchange_in(x_MD, counts_PE)
                return self.exchange_out(experts(x_RD, tokens_dev, tokens_host), state)

            # Recomputed in backward (same order on every rank): only this round's rows are ever received.
            y_MD = torch.utils.checkpoint.checkpoint(one_round, plan.x_MD[rows], use_reentrant=False)
            out_TD = out_TD.index_add(
                0, plan.token_idx_M[rows], y_MD.to(out_TD.dtype) * plan.weights_M[rows].unsqueeze(-1)
            )
        return out_TD, plan, rounds
