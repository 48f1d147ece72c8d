"""Step time from the recorded step: every kernel at its roofline, every collective at link bandwidth, replayed
on a host clock, a compute stream and a communication stream, with the planned ranks in lockstep.

Kernel time = max(work FLOPs / peak FLOP/s of its dtype, bytes / HBM bandwidth, the shortest kernel).
Collective time = latency + bytes / link bandwidth, by link class: NVLink between GPUs of one node, the
network (one NIC per GPU, rail-optimised) between nodes:
- all_to_all: this rank's bytes to (and from) peers in its node over NVLink, to other nodes over its NIC,
  both at once; what a rank sends to itself moves no data;
- all_reduce over n ranks: 2(n-1)/n of the buffer; all_gather / reduce_scatter: (n-1)/n of the full buffer;
  at the bandwidth of the slowest hop: NVLink inside a node, else min(NVLink, ranks per node x NIC).
Overlap is what the code does, not assumed per engine: collectives issued on a side stream or with async_op
(FSDP2's all-gathers and reduce-scatters, asynchronous gradient all-reduces) run on the communication stream
from the moment they are issued and the compute stream goes on; a kernel that reads what such a collective
writes waits for it. Blocking collectives (the MoE all-to-alls, the norm all-reduce) run on the compute stream
and hold every planned rank until the slowest arrives and the slowest transfer ends (lockstep), so a hot
rank's extra expert work shows up as the others' wait. Host syncs stop the host until the GPU drains; the host
pays a dispatch cost per kernel, so small models come out launch-bound as they are in eager PyTorch.

Two figures: the roofline (peak FLOP/s and bandwidths: a bound) and the estimate (the achievable fractions in
moe_dist/hardware.py). Not modelled: SM contention between NCCL and compute kernels, link sharing between
concurrent collectives, network congestion, stragglers, data loading.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from moe_dist.hardware import GPU, Overheads
from moe_dist.planning.recorder import Collective, Kernel, Sync

DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8",
    torch.float8_e5m2: "fp8",
}


@dataclass(frozen=True)
class Layout:
    world_size: int
    gpus_per_node: int

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node


@dataclass
class Rates:
    """Bandwidths and peaks in use: the datasheet's (roofline) or scaled by the achievable fractions."""

    gpu: GPU
    derated: bool
    overheads: Overheads

    def fraction(self, what: str) -> float:
        return self.gpu.achievable.get(what, 1.0) if self.derated else 1.0

    def kernel_s(self, k: Kernel) -> float:
        t = k.bytes / (self.gpu.hbm_bytes_per_s * self.fraction("hbm"))
        if k.work_flops:
            peak = self.gpu.matmul_flops(DTYPES.get(k.dtype, "fp32")) * self.fraction("matmul")
            t = max(t, k.work_flops / peak)
        return max(t, self.overheads.kernel_s)

    def collective_s(self, c: Collective, layout: Layout, me: int) -> float:
        n = len(c.group)
        if n == 1:
            return 0.0
        nodes = {layout.node(r) for r in c.group}
        nvlink = self.gpu.nvlink_bytes_per_s * self.fraction("nvlink")
        network = self.gpu.network_bytes_per_s * self.fraction("network")
        latency = self.overheads.collective_inter_s if len(nodes) > 1 else self.overheads.collective_intra_s
        if c.kind == "all_to_all":
            send, recv = c.send_to, c.recv_from
            if not send:  # no per-peer splits recorded: an even split over the group
                share = c.nbytes // n
                send = recv = dict.fromkeys(c.group, share)
            here = layout.node(me)
            intra = max(
                sum(b for r, b in d.items() if r != me and layout.node(r) == here) for d in (send, recv)
            )
            inter = max(sum(b for r, b in d.items() if layout.node(r) != here) for d in (send, recv))
            return latency + max(intra / nvlink, inter / network)
        bandwidth = nvlink if len(nodes) == 1 else min(nvlink, (n / len(nodes)) * network)
        factor = {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(c.kind, (n - 1) / n)
        return latency + factor * c.nbytes / bandwidth


@dataclass
class RankTime:
    """One rank's step on the three clocks, and where its time went."""

    step_s: float = 0.0
    compute_s: float = 0.0  # kernels running on the compute stream
    compute_by_phase: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    comm_exposed_s: dict[str, float] = field(
        default_factory=lambda: defaultdict(float)
    )  # on the critical path
    comm_total_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # incl. overlapped
    imbalance_s: float = 0.0  # waiting for slower ranks at blocking collectives
    host_bound_s: float = 0.0  # the GPU idle, waiting for the host (dispatch, syncs)
    num_kernels: int = 0
    num_syncs: int = 0


class _Clocks:
    def __init__(self, rank: int):
        self.rank = rank
        self.host = self.gpu = self.comm = 0.0
        self.pending: dict[int, tuple[float, str]] = {}  # storage serial -> (ready time, collective kind)
        self.time = RankTime()

    def launch(self, reads, overheads: Overheads) -> float:
        """Host dispatches one kernel or collective; returns when the compute stream can start it."""
        self.host += overheads.host_per_op_s
        ready, kind = self.gpu, None
        for serial in reads:
            if serial in self.pending and self.pending[serial][0] > ready:
                ready, kind = self.pending[serial]
        if kind is not None and ready > max(self.gpu, self.host):
            self.time.comm_exposed_s[kind] += ready - max(self.gpu, self.host)
        elif self.host > self.gpu:
            self.time.host_bound_s += self.host - self.gpu
        return max(ready, self.host, self.gpu)


def simulate(traces: list[list], *, ranks: list[int], layout: Layout, rates: Rates) -> list[RankTime]:
    """Replays the planned ranks' recorded steps together; one RankTime per rank."""
    clocks = [_Clocks(r) for r in ranks]
    streams = [iter(t) for t in traces]
    overheads = rates.overheads
    while True:
        blocking: list[Collective | None] = []
        for clock, events in zip(clocks, streams):
            blocking.append(_run_until_blocking(clock, events, layout, rates))
        if all(b is None for b in blocking):
            break
        assert all(b is not None for b in blocking), "planned ranks issued different blocking collectives"
        arrivals = [clock.launch(b.reads, overheads) for clock, b in zip(clocks, blocking)]
        durations = [rates.collective_s(b, layout, clock.rank) for clock, b in zip(clocks, blocking)]
        start, longest = max(arrivals), max(durations)
        for clock, b, arrival, duration in zip(clocks, blocking, arrivals, durations):
            clock.time.imbalance_s += (start - arrival) + (longest - duration)
            clock.time.comm_exposed_s[b.kind] += duration
            clock.time.comm_total_s[b.kind] += duration
            clock.gpu = start + longest
    for clock in clocks:
        end = max(clock.host, clock.gpu, clock.comm)
        if clock.comm > max(clock.host, clock.gpu):
            clock.time.comm_exposed_s["overlap_tail"] += clock.comm - max(clock.host, clock.gpu)
        clock.time.step_s = end
    step = max(clock.time.step_s for clock in clocks)
    for clock in clocks:  # every rank ends the step when the slowest does (the next step's collectives)
        clock.time.imbalance_s += step - clock.time.step_s
        clock.time.step_s = step
    return [clock.time for clock in clocks]


def _run_until_blocking(clock: _Clocks, events, layout: Layout, rates: Rates) -> Collective | None:
    overheads = rates.overheads
    for event in events:
        if isinstance(event, Kernel):
            start = clock.launch(event.reads, overheads)
            duration = rates.kernel_s(event)
            clock.gpu = start + duration
            clock.time.compute_s += duration
            clock.time.compute_by_phase[event.phase] += duration
            clock.time.num_kernels += 1
        elif isinstance(
            event, Sync
        ):  # the host waits for the queue to drain; the GPU then waits for the host
            clock.host = max(clock.host, clock.gpu) + overheads.host_sync_s
            clock.time.num_syncs += 1
        elif event.side:
            clock.host += overheads.host_per_op_s
            start = max(clock.comm, clock.host, clock.gpu)  # the side stream waits for the work issued before
            duration = rates.collective_s(event, layout, clock.rank)
            clock.comm = start + duration
            clock.time.comm_total_s[event.kind] += duration
            for serial in event.writes:
                clock.pending[serial] = (clock.comm, event.kind)
        else:
            return event
    return None
