"""Token dispatch and combine: a mirrored pair around the grouped experts.

Legend: T tokens on this rank, K experts per token, N = T·K token copies, M kept copies (N when dropless),
D model dim, E global experts, P = ep ranks, L = E / P local experts, C overlap chunks, R received rows.

dispatch: order the copies by (chunk, expert), drops last → exchange the counts (the layer's one host
          sync) → gather the kept copies straight into the send buffer → all_to_all with uneven splits.
          Received rows stay in (source rank, local expert) order; ``ExpertRows`` tells the experts where
          each segment lies, so no reorder copy is made.
combine:  the mirror: all_to_all back → Σ_k gate·y in one fused pass, into fp32 rows (fp64 in fp64 mode).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from moe_dist.moe.buffers import new_rows
from moe_dist.precision import accum_dtype
from moe_dist.transfer import int_tensor, to_device


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = new_rows(x, (sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = new_rows(grad_out, (sum(ctx.in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, *, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _GatherRows(torch.autograd.Function):
    """Rows of x_TD gathered into a new [M, D] buffer (the send buffer); backward adds them back per token."""

    @staticmethod
    def forward(ctx, x_TD, token_idx_M):
        ctx.save_for_backward(token_idx_M)
        ctx.num_tokens = x_TD.shape[0]
        out_MD = new_rows(x_TD, (token_idx_M.shape[0], x_TD.shape[1]))
        return torch.index_select(x_TD, 0, token_idx_M, out=out_MD)

    @staticmethod
    def backward(ctx, grad_MD):
        (token_idx_M,) = ctx.saved_tensors
        grad_TD = grad_MD.new_zeros((ctx.num_tokens, grad_MD.shape[1]))
        return grad_TD.index_add_(0, token_idx_M, grad_MD), None


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


def send_order(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    counts_E: torch.Tensor,
    *,
    capacity: int | None,
    chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of the N copies to send, kept copies per (chunk, expert) [C, E]), both on the device, no sync.

    Copies go by (chunk, expert), which is (destination rank, local expert) within each chunk; chunk c holds
    the tokens t with ⌊t·C/T⌋ = c. With a capacity each expert keeps its ``capacity`` copies of highest gate
    weight (ties: the earlier copy) in that priority order, and the dropped copies come last: the caller
    cuts them once the kept count is on the host.
    """
    T, K = expert_ids_TK.shape
    E = counts_E.numel()
    ids_N = expert_ids_TK.reshape(-1)
    key_N = ids_N
    if chunks > 1:
        token_N = torch.arange(T * K, device=ids_N.device) // K
        key_N = token_N * chunks // max(T, 1) * E + ids_N
    if capacity is None:
        order_N = torch.sort(key_N, stable=True).indices
        if chunks == 1:
            return order_N, counts_E.view(1, E)
        kept = torch.zeros(chunks * E, dtype=torch.int64, device=ids_N.device)
        return order_N, kept.index_add_(0, key_N, torch.ones_like(key_N)).view(chunks, E)
    priority_N = sort_copies_by_expert(expert_ids_TK, weights_TK, by_gate=True)
    rank_in_expert_N = (
        torch.arange(T * K, device=ids_N.device) - exclusive_cumsum(counts_E)[ids_N[priority_N]]
    )
    key_by_priority_N = torch.where(rank_in_expert_N < capacity, key_N[priority_N], chunks * E)
    order_N = priority_N[torch.sort(key_by_priority_N, stable=True).indices]
    kept = torch.zeros(chunks * E + 1, dtype=torch.int64, device=ids_N.device)
    kept.index_add_(0, key_by_priority_N, torch.ones_like(key_by_priority_N))
    return order_N, kept[:-1].view(chunks, E)


COMBINE_BLOCK_BYTES = 1 << 20  # CPU: gate-weighted rows are formed this many bytes at a time (cache-sized)


def _blocks(rows_MD: torch.Tensor) -> list[slice]:
    """Row blocks of COMBINE_BLOCK_BYTES on CPU (temporaries stay in cache); one block on GPUs."""
    M = rows_MD.shape[0]
    if rows_MD.device.type != "cpu":
        return [slice(0, M)]
    block = max(1, COMBINE_BLOCK_BYTES // (4 * max(1, rows_MD.shape[1])))
    return [slice(s, s + block) for s in range(0, M, block)]


class _WeightedSum(torch.autograd.Function):
    """out_TD[t] = Σ over the kept copies m of token t of weights_M[m] · y_MD[m], summed in the gate weights'
    dtype (fp32; fp64 for fp64 weights).

    One fused pass: on CPU the weighted rows are formed a cache-sized block at a time and added straight into
    the output, so no [M, D] temporary exists; backward gathers the output gradient once, takes the gate
    gradients from it, and scales it in place into the rows' gradient.
    """

    @staticmethod
    def forward(ctx, y_MD, weights_M, token_idx_M, num_tokens: int):
        out_TD = y_MD.new_zeros((num_tokens, y_MD.shape[1]), dtype=weights_M.dtype)
        for rows in _blocks(y_MD):
            out_TD.index_add_(0, token_idx_M[rows], y_MD[rows].to(weights_M.dtype) * weights_M[rows, None])
        ctx.save_for_backward(y_MD, weights_M, token_idx_M)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        y_MD, weights_M, token_idx_M = ctx.saved_tensors
        dtype = weights_M.dtype
        grad_MD = new_rows(grad_TD, (token_idx_M.shape[0], grad_TD.shape[1]), dtype=dtype)
        torch.index_select(grad_TD.to(dtype), 0, token_idx_M, out=grad_MD)
        grad_weights = None
        if ctx.needs_input_grad[1]:  # row-wise dot products, a block at a time (no [M, D] temporary)
            grad_weights = torch.empty_like(weights_M)
            for rows in _blocks(y_MD):
                torch.sum(grad_MD[rows] * y_MD[rows].to(dtype), dim=-1, out=grad_weights[rows])
        grad_y = grad_MD.mul_(weights_M[:, None]).to(y_MD.dtype) if ctx.needs_input_grad[0] else None
        return grad_y, grad_weights, None, None


def weighted_sum(
    y_MD: torch.Tensor, weights_M: torch.Tensor, token_idx_M: torch.Tensor, *, num_tokens: int
) -> torch.Tensor:
    """Rows [T, D] in the gate weights' dtype: Σ over kept copies of gate · expert output."""
    return _WeightedSum.apply(y_MD, weights_M, token_idx_M, num_tokens)


@dataclass
class ExpertRows:
    """Where each local expert's rows lie in the row buffer handed to the experts.

    Segment (p, l) holds the rows source rank p sent to local expert l; segments follow each other in
    (p, l) order, as the all-to-all delivers them. Without an exchange there is one source: expert-major.
    """

    counts_PL: list[list[int]] | None  # rows per (source rank, local expert) on the host; None: not read yet
    device_counts_L: torch.Tensor | None = None  # rows per local expert on the device, once there
    read_counts: Callable[[torch.Tensor], list] | None = None  # the dispatcher's exchange_counts

    @classmethod
    def from_device(cls, tokens_per_expert_L: torch.Tensor, *, read_counts) -> ExpertRows:
        """Expert-major rows whose counts are still on the device (no exchange happened); ``read_counts``
        brings them to the host if the experts need them there (the dispatcher's ``exchange_counts``)."""
        return cls(counts_PL=None, device_counts_L=tokens_per_expert_L, read_counts=read_counts)

    def host_counts(self) -> list[list[int]]:
        if self.counts_PL is None:
            # Host sync; only without an exchange (ep == 1, dropless), whose counts never reached the host.
            self.counts_PL = self.read_counts(self.device_counts_L.view(1, -1))[0]
        return self.counts_PL

    def tokens_per_expert(self, device: torch.device) -> torch.Tensor:
        """int64 [L] on ``device`` (a non-blocking copy of the host counts when they are on the host)."""
        if self.device_counts_L is None:
            self.device_counts_L = int_tensor([sum(col) for col in zip(*self.counts_PL)], device)
        return self.device_counts_L

    def segments(self) -> list[list[tuple[int, int]]]:
        """Per local expert, its non-empty (first row, rows) segments in row order."""
        counts_PL = self.host_counts()
        segments: list[list[tuple[int, int]]] = [[] for _ in counts_PL[0]]
        start = 0
        for row in counts_PL:
            for expert, n in enumerate(row):
                if n:
                    segments[expert].append((start, n))
                start += n
        return segments

    def expert_major_order(self) -> torch.Tensor | None:
        """Host row index that reorders (source, expert) rows to (expert, source); None when already so."""
        if self.counts_PL is None or len(self.counts_PL) == 1:
            return None
        segments = [seg for segs in self.segments() for seg in segs]
        starts_S, lengths_S = torch.tensor(segments, dtype=torch.int64).reshape(-1, 2).unbind(dim=1)
        # The row count from the host lists, not from the tensor: moe_dist.plan runs this on fake tensors.
        return segment_index(starts_S, lengths_S, sum(n for _, n in segments))


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Plan:
    """The kept token copies in send order and every count the exchange needs."""

    num_tokens: int
    token_idx_M: torch.Tensor  # token row of each kept copy, in send order: (chunk, expert)
    weights_M: torch.Tensor  # gate weight of each kept copy (fp32; fp64 in fp64 mode), same order
    x_MD: torch.Tensor  # the kept copies, same order: the send buffer
    kept_CE: torch.Tensor  # kept copies per (chunk, global expert) on this rank (device)
    counts_PCE: list[list[list[int]]] | None  # the same for every EP rank, on the host (None: not read)
    num_dropped: int | None  # None when dropless

    @property
    def kept_E(self) -> torch.Tensor:
        return self.kept_CE.sum(dim=0) if self.kept_CE.shape[0] > 1 else self.kept_CE[0]

    @functools.cached_property
    def counts_PE(self) -> list[list[int]] | None:
        """Kept copies per (EP rank, global expert), all chunks together (host)."""
        if self.counts_PCE is None:
            return None
        return [[sum(col) for col in zip(*per_chunk)] for per_chunk in self.counts_PCE]


@dataclass
class RoundState:
    """One exchange: the split sizes combine needs to send expert outputs back."""

    send_splits: list[int]
    recv_splits: list[int]


@dataclass
class Dispatched:
    x_RD: torch.Tensor  # received rows in (source rank, local expert) order, as ``rows`` describes
    rows: ExpertRows
    num_dropped: int | None  # copies dropped by capacity on this rank (None when dropless)
    plan: Plan
    round: RoundState | None  # None when ep == 1 (no exchange)


class TokenDispatcher:
    """Sort-based, padding-free dispatch over an expert-parallel group (or locally when ep == 1).

    With ``recv_budget`` (rows), a step whose routing would make some rank receive more rows than the budget
    runs the exchange and the expert compute in rounds, each recomputed in backward (activation
    checkpointing), so the receive-side activations stay bounded while routing stays dropless.
    With ``overlap_chunks`` = C > 1 the local tokens go in C chunks whose exchanges overlap the experts of the
    chunk before (forward and backward; ``_ChunkPipeline``).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        group: dist.ProcessGroup | None = None,
        ep: int = 1,
        recv_budget: int | None = None,
        overlap_chunks: int = 1,
    ):
        assert num_experts % ep == 0
        assert overlap_chunks == 1 or recv_budget is None, (
            "overlap chunks and a receive budget exclude each other"
        )
        self.num_experts, self.group, self.ep = num_experts, group, ep
        self.num_local = num_experts // ep
        self.recv_budget = recv_budget
        self.overlap_chunks = overlap_chunks
        self.ep_rank = dist.get_rank(group) if group is not None else 0

    def exchange_counts(self, kept_CE: torch.Tensor) -> list[list[list[int]]]:
        """Kept copies per (EP rank, chunk, global expert), on the host of every rank of the EP group.

        The layer's one device-to-host sync: the exchange's split sizes must be known on the host. It is the
        one place these counts come from: moe_dist.plan (fake tensors, no values) replaces it per dispatcher
        with the routing it plans for (planning/routing.py); training never touches it.
        """
        C, E = kept_CE.shape
        if self.group is None:
            flat = kept_CE.reshape(-1).tolist()  # host sync
        else:
            gathered = kept_CE.new_empty(self.ep * C * E)
            _all_gather(gathered, kept_CE.reshape(-1).contiguous(), group=self.group)
            flat = gathered.tolist()  # host sync: waits for the all-gather
        return [
            [flat[(p * C + c) * E : (p * C + c + 1) * E] for c in range(C)]
            for p in range(len(flat) // (C * E))
        ]

    def plan(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        counts_E: torch.Tensor,
        *,
        capacity: int | None,
        chunks: int = 1,
    ) -> Plan:
        T, K = expert_ids_TK.shape
        order_N, kept_CE = send_order(expert_ids_TK, weights_TK, counts_E, capacity=capacity, chunks=chunks)
        counts_PCE = None
        if self.group is not None or capacity is not None:
            counts_PCE = self.exchange_counts(kept_CE)
        num_kept = T * K
        if capacity is not None:
            num_kept = sum(map(sum, counts_PCE[self.ep_rank]))
            order_N = order_N[:num_kept]
        token_idx_M = order_N // K
        return Plan(
            num_tokens=T,
            token_idx_M=token_idx_M,
            weights_M=weights_TK.reshape(-1)[order_N].to(accum_dtype(weights_TK)),
            x_MD=_GatherRows.apply(x_TD, token_idx_M),  # gathered straight into send order
            kept_CE=kept_CE,
            counts_PCE=counts_PCE,
            num_dropped=None if capacity is None else T * K - num_kept,
        )

    def num_rounds(self, plan: Plan) -> int:
        """Rounds needed so that no rank receives more than recv_budget rows in one round.

        Every rank computes the same number from the gathered counts, so no further collective is needed.
        """
        if self.recv_budget is None or plan.counts_PCE is None:
            return 1
        L, counts_PE = self.num_local, plan.counts_PE
        most = max(sum(sum(row[q * L : (q + 1) * L]) for row in counts_PE) for q in range(self.ep))
        return max(1, -(-most // self.recv_budget))

    def _round_pieces(self, plan: Plan, rounds: int, r: int) -> tuple[list[list[int]], list[int]]:
        """Round r's kept copies per (EP rank, global expert), and this rank's offset into each expert segment.

        Each receiver's incoming rows, in (source rank, local expert) order, are cut into windows of
        recv_budget rows; round r exchanges window r of every receiver.
        """
        if rounds == 1:
            return plan.counts_PE, [0] * self.num_experts
        L, budget, all_counts_PE = self.num_local, self.recv_budget, plan.counts_PE
        window = (r * budget, (r + 1) * budget)
        counts_PE = [[0] * self.num_experts for _ in range(self.ep)]
        offsets_E = [0] * self.num_experts
        for q in range(self.ep):
            position = 0  # where the next segment starts in receiver q's incoming stream
            for p in range(self.ep):
                for e in range(q * L, (q + 1) * L):
                    n = all_counts_PE[p][e]
                    lo, hi = max(position, window[0]), min(position + n, window[1])
                    if hi > lo:
                        counts_PE[p][e] = hi - lo
                        if p == self.ep_rank:
                            offsets_E[e] = lo - position
                    position += n
        return counts_PE, offsets_E

    def received_rows_per_round(self, plan: Plan, rounds: int) -> int | None:
        """Peak rows this rank received in one round (None without an exchange): what the budget bounds."""
        if self.group is None or plan.counts_PCE is None:
            return None
        L, me = self.num_local, self.ep_rank
        return max(
            sum(sum(row[me * L : (me + 1) * L]) for row in self._round_pieces(plan, rounds, r)[0])
            for r in range(rounds)
        )

    def _splits(self, counts_PE: list[list[int]]) -> tuple[RoundState, list[list[int]]]:
        """Split sizes of one exchange, and the received rows per (source rank, local expert)."""
        L, P, me = self.num_local, self.ep, self.ep_rank
        send_splits = [sum(counts_PE[me][q * L : (q + 1) * L]) for q in range(P)]
        counts_PL = [counts_PE[p][me * L : (me + 1) * L] for p in range(P)]
        return RoundState(send_splits, [sum(row) for row in counts_PL]), counts_PL

    def exchange_in(
        self, x_MD: torch.Tensor, counts_PE: list[list[int]]
    ) -> tuple[torch.Tensor, RoundState, ExpertRows]:
        """Sends rows to the ranks owning their experts; received rows stay in (source rank, local expert)
        order."""
        state, counts_PL = self._splits(counts_PE)
        x_RD = all_to_all(x_MD, out_splits=state.recv_splits, in_splits=state.send_splits, group=self.group)
        return x_RD, state, ExpertRows(counts_PL)

    def exchange_out(self, y_RD: torch.Tensor, state: RoundState) -> torch.Tensor:
        """Reverse of exchange_in: expert outputs back to the ranks (and row order) they came from."""
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
        """Plan and exchange in one round (ignores recv_budget and overlap_chunks; see ``forward``)."""
        return self._exchange_all(self.plan(x_TD, expert_ids_TK, weights_TK, counts_E, capacity=capacity))

    def _exchange_all(self, plan: Plan) -> Dispatched:
        if self.group is None:
            rows = ExpertRows.from_device(plan.kept_E, read_counts=self.exchange_counts)
            if plan.counts_PCE is not None:
                rows.counts_PL = plan.counts_PE
            return Dispatched(plan.x_MD, rows, plan.num_dropped, plan, None)
        x_RD, state, rows = self.exchange_in(plan.x_MD, plan.counts_PE)
        return Dispatched(x_RD, rows, plan.num_dropped, plan, state)

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """Reverse of dispatch; returns rows [T, D] = Σ over kept copies of gate · expert output, summed in
        the gate weights' dtype (fp32; fp64 for fp64 weights)."""
        y_MD = y_RD if dispatched.round is None else self.exchange_out(y_RD, dispatched.round)
        plan = dispatched.plan
        return weighted_sum(y_MD, plan.weights_M, plan.token_idx_M, num_tokens=plan.num_tokens)

    def forward(
        self, x_TD, expert_ids_TK, weights_TK, counts_E, *, capacity, experts
    ) -> tuple[torch.Tensor, Plan, int]:
        """route-result → fp32 output rows [T, D], the plan, and the number of exchange rounds used."""
        chunks = self.overlap_chunks if self.group is not None else 1
        plan = self.plan(x_TD, expert_ids_TK, weights_TK, counts_E, capacity=capacity, chunks=chunks)
        rounds = self.num_rounds(plan)
        if rounds > 1:
            return self._forward_rounds(plan, rounds, experts), plan, rounds
        if chunks > 1:
            y_MD = _pipelined(self, plan, experts)
            return weighted_sum(y_MD, plan.weights_M, plan.token_idx_M, num_tokens=plan.num_tokens), plan, 1
        d = self._exchange_all(plan)
        return self.combine(experts(d.x_RD, d.rows), d), plan, 1

    def _forward_rounds(self, plan: Plan, rounds: int, experts) -> torch.Tensor:
        device, out_TD = plan.x_MD.device, None
        starts_E = exclusive_cumsum(torch.tensor(plan.counts_PE[self.ep_rank], dtype=torch.int64))
        for r in range(rounds):
            counts_PE, offsets_E = self._round_pieces(plan, rounds, r)
            lengths_E = counts_PE[self.ep_rank]
            rows_host = segment_index(
                starts_E + torch.tensor(offsets_E), torch.tensor(lengths_E, dtype=torch.int64), sum(lengths_E)
            )
            rows = to_device(rows_host, device)  # this round's copies, built on the host: no sync

            def one_round(x_MD, counts_PE=counts_PE):
                x_RD, state, expert_rows = self.exchange_in(x_MD, counts_PE)
                return self.exchange_out(experts(x_RD, expert_rows), state)

            # Recomputed in backward (same order on every rank): only this round's rows are ever received.
            y_MD = torch.utils.checkpoint.checkpoint(
                one_round, plan.x_MD.index_select(0, rows), use_reentrant=False
            )
            part_TD = weighted_sum(
                y_MD,
                plan.weights_M.index_select(0, rows),
                plan.token_idx_M.index_select(0, rows),
                num_tokens=plan.num_tokens,
            )
            out_TD = part_TD if out_TD is None else out_TD + part_TD
        return out_TD


# ---------------------------------------------------------------------------------------------------------
# The chunked EP pipeline (model.moe.overlap_chunks)


@dataclass
class _Chunk:
    rows: slice  # this chunk's copies in the send buffer
    state: RoundState
    expert_rows: ExpertRows


def _chunks(dispatcher: TokenDispatcher, plan: Plan) -> list[_Chunk]:
    chunks, start, me = [], 0, dispatcher.ep_rank
    C = len(plan.counts_PCE[0])
    for c in range(C):
        state, counts_PL = dispatcher._splits([plan.counts_PCE[p][c] for p in range(dispatcher.ep)])
        n = sum(plan.counts_PCE[me][c])
        chunks.append(_Chunk(slice(start, start + n), state, ExpertRows(counts_PL)))
        start += n
    return chunks


def _start_exchange(
    src: torch.Tensor, out: torch.Tensor, *, out_splits: list[int], in_splits: list[int], group
) -> dist.Work:
    """all_to_all_single in flight (gloo runs it on its own thread, NCCL on its own stream); ``src`` and
    ``out`` must stay alive until ``wait()``."""
    return dist.all_to_all_single(out, src, out_splits, in_splits, group=group, async_op=True)


def _run_pipeline(
    x_MD: torch.Tensor, dispatcher: TokenDispatcher, experts, chunks: list[_Chunk], *, build_graph: bool
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Forward: chunk c+1's rows travel while chunk c's experts compute, and chunk c's outputs travel back
    while chunk c+1's compute. Returns the outputs in send order [M, D] and, with ``build_graph``, each
    chunk's (received rows, expert outputs) for backward."""
    group, x_MD = dispatcher.group, x_MD.contiguous()
    received = [new_rows(x_MD, (sum(c.state.recv_splits), x_MD.shape[1])) for c in chunks]
    y_MD = None
    arriving, leaving, graphs = {}, [], []

    def send(c: int) -> None:
        s = chunks[c].state
        arriving[c] = _start_exchange(
            x_MD[chunks[c].rows], received[c], out_splits=s.recv_splits, in_splits=s.send_splits, group=group
        )

    send(0)
    for c, chunk in enumerate(chunks):
        if c + 1 < len(chunks):
            send(c + 1)
        arriving.pop(c).wait()
        x_RD = received[c].requires_grad_(build_graph)
        with torch.set_grad_enabled(build_graph):
            y_RD = experts(x_RD, chunk.expert_rows)
        if y_MD is None:
            y_MD = new_rows(y_RD, (x_MD.shape[0], y_RD.shape[1]))
        out_RD = y_RD.detach().contiguous()
        s = chunk.state
        leaving.append(
            (
                out_RD,
                _start_exchange(
                    out_RD, y_MD[chunk.rows], out_splits=s.send_splits, in_splits=s.recv_splits, group=group
                ),
            )
        )
        if build_graph:
            graphs.append((x_RD, y_RD))
    for _, work in leaving:
        work.wait()
    return y_MD, graphs


class _ChunkPipeline(torch.autograd.Function):
    """Exchange → experts → exchange back, chunk by chunk with the exchanges in flight, in both directions.

    Each chunk's expert compute keeps its own autograd graph (from the received rows); backward sends the
    output gradients chunk by chunk, runs each chunk's graph while the next chunk's gradients travel, and
    returns the expert parameters' gradients summed over chunks.
    """

    @staticmethod
    def forward(ctx, x_MD, dispatcher, experts, chunks, *params):
        y_MD, graphs = _run_pipeline(x_MD, dispatcher, experts, chunks, build_graph=True)
        ctx.dispatcher, ctx.chunks, ctx.graphs, ctx.x_dtype = dispatcher, chunks, graphs, x_MD.dtype
        ctx.params = params
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        group, chunks, params = ctx.dispatcher.group, ctx.chunks, ctx.params
        dy_MD = dy_MD.contiguous()
        dx_MD = new_rows(dy_MD, dy_MD.shape, dtype=ctx.x_dtype)
        received = [new_rows(dy_MD, (sum(c.state.recv_splits), dy_MD.shape[1])) for c in chunks]
        arriving, leaving = {}, []
        param_grads: list[torch.Tensor | None] = [None] * len(params)

        def send(c: int) -> None:
            s = chunks[c].state
            arriving[c] = _start_exchange(
                dy_MD[chunks[c].rows],
                received[c],
                out_splits=s.recv_splits,
                in_splits=s.send_splits,
                group=group,
            )

        send(0)
        for c, chunk in enumerate(chunks):
            if c + 1 < len(chunks):
                send(c + 1)
            arriving.pop(c).wait()
            x_RD, y_RD = ctx.graphs[c]
            dx_RD, *grads = torch.autograd.grad(y_RD, [x_RD, *params], received[c], allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            dx_RD = dx_RD.to(ctx.x_dtype).contiguous()
            s = chunk.state
            leaving.append(
                (
                    dx_RD,
                    _start_exchange(
                        dx_RD,
                        dx_MD[chunk.rows],
                        out_splits=s.send_splits,
                        in_splits=s.recv_splits,
                        group=group,
                    ),
                )
            )
        for _, work in leaving:
            work.wait()
        ctx.graphs = None
        return (dx_MD, None, None, None, *param_grads)


def _pipelined(dispatcher: TokenDispatcher, plan: Plan, experts) -> torch.Tensor:
    """Expert outputs in send order [M, D] through the chunked pipeline."""
    chunks = _chunks(dispatcher, plan)
    params = [p for p in experts.parameters() if p.requires_grad]
    if not (torch.is_grad_enabled() and (plan.x_MD.requires_grad or params)):
        return _run_pipeline(plan.x_MD, dispatcher, experts, chunks, build_graph=False)[0]
    return _ChunkPipeline.apply(plan.x_MD, dispatcher, experts, chunks, *params)
