"""Benchmark of one MoE layer: moe_dist against deepspeed.moe.layer.MoE, with the machine's floors.

    torchrun --nproc_per_node 2 scripts/bench_moe.py [--json PATH] [--configs A,B,C] [--steps N] [--warmup N]

Both implementations run in one process group on the same inputs with the same router and expert weights.
A step is fwd+bwd of ``loss = Σ(y·g) + 0.01·aux`` for a fixed random ``g`` (the input needs a gradient too);
the ranks meet at a barrier before every timed step, a step's time is the slowest rank's, and the two
implementations alternate step by step so that both see the same machine. In the same run the script
measures the floors: dense GEMM FLOP/s at the experts' shapes and all_to_all_single bandwidth at the
layer's dispatch size.

CPU / gloo: fp32; peak memory is the peak of cumulative allocated bytes over one step, from the memory
events of ``torch.profiler.profile(profile_memory=True)``. CUDA / NCCL (same script, unchanged): bf16
autocast, ``torch.cuda.synchronize`` around every timer, peak memory from ``torch.cuda.max_memory_allocated``.
Both count bytes allocated during the step (activations, temporaries, gradients), not the weights.

Legend: T tokens per rank, D model dim, F expert hidden dim, E experts, K experts per token,
P expert-parallel ranks, L = E / P local experts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from bench_common import source_version
from torch import nn

from moe_dist import MoEConfig, MoELayer, build_mesh, parallelize_moe, sync_gradients
from moe_dist.parallel.mesh import Mesh

SEED = 1234
AUX_LOSS_COEF = 0.01
ZIPF_EXPONENT = 1.0
PROFILE_TOP_OPS = 12
GEMM_OPS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm"})


@dataclass(frozen=True)
class Case:
    """One layer configuration; ``name`` starts with the config letter (A, B, C, D)."""

    name: str
    dim: int
    hidden: int
    num_experts: int
    top_k: int
    tokens: int  # per rank
    capacity_factor: float | None  # None: dropless (DeepSpeed drop_tokens=False)
    routing: str  # "uniform-ish" (random router) or "zipf"
    grad_sync: bool = False  # include each implementation's gradient all-reduce (EP x DP config D)
    loop_variant: bool = False  # also time moe_dist with grouped_mm="off"

    @property
    def letter(self) -> str:
        return self.name[0]

    def flops_per_copy(self) -> int:
        """fwd+bwd FLOPs of one routed token copy through a SwiGLU expert: 3 x (2·D·2F + 2·F·D)."""
        return 3 * (2 * self.dim * 2 * self.hidden + 2 * self.hidden * self.dim)


SHAPE_A = {"dim": 256, "hidden": 1024, "num_experts": 8, "top_k": 2}  # also C and D
SHAPE_B = {"dim": 256, "hidden": 256, "num_experts": 64, "top_k": 8}  # fine-grained


def build_cases(letters: list[str], *, tokens: int, capacity_factor: float, world: int) -> list[Case]:
    """A and B at equal capacity factor and dropless; C Zipf-skewed dropless; D (world 4) EP x DP dropless."""
    cf, cases = capacity_factor, []
    for letter in letters:
        if letter in ("A", "B"):
            shape = {**(SHAPE_A if letter == "A" else SHAPE_B), "tokens": tokens}
            cases.append(Case(f"{letter}-cf{cf:g}", **shape, capacity_factor=cf, routing="uniform-ish"))
            cases.append(
                Case(
                    f"{letter}-dropless",
                    **shape,
                    capacity_factor=None,
                    routing="uniform-ish",
                    loop_variant=letter == "A",
                )
            )
        elif letter == "C":
            cases.append(
                Case("C-zipf-dropless", **SHAPE_A, tokens=tokens, capacity_factor=None, routing="zipf")
            )
        elif letter == "D":
            if world == 4:
                cases.append(
                    Case(
                        "D-ep2-edp2-dropless",
                        **SHAPE_A,
                        tokens=tokens,
                        capacity_factor=None,
                        routing="uniform-ish",
                        grad_sync=True,
                    )
                )
            elif dist.get_rank() == 0:
                print(
                    f"bench_moe: config D needs world 4 (ep 2 x edp 2), this run has world {world}: skipped"
                )
        else:
            raise ValueError(f"--configs: unknown config {letter!r} (choose from A, B, C, D)")
    return cases


# ---------------------------------------------------------------------------------------------------------
# Runtime: device, process group, timers


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int
    mesh: Mesh

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32

    def rank_max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def rank_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def rank_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()


def init_runtime(*, ep: int | None, num_experts: int) -> Runtime:
    if "RANK" not in os.environ:  # plain `python scripts/bench_moe.py`: a one-rank group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=600))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    world = dist.get_world_size()
    mesh = build_mesh(ep=ep or min(2, world), num_experts=num_experts)
    return Runtime(device=device, rank=dist.get_rank(), world=world, mesh=mesh)


def load_deepspeed(rt: Runtime) -> ModuleType:
    """Imports DeepSpeed (its accelerator is chosen at import time) and attaches it to our process group."""
    if not rt.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses the initialised default group
    return deepspeed


def timed_steps(
    rt: Runtime, fns: dict[str, Callable[[], Any]], *, warmup: int, steps: int
) -> dict[str, list[float]]:
    """Per-step times (slowest rank) of each function; the functions alternate step by step."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    local: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            dist.barrier()
            rt.sync()
            t0 = time.perf_counter()
            fn()
            rt.sync()
            local[name].append(time.perf_counter() - t0)
    return {name: rt.rank_max(times) for name, times in local.items()}


class ExchangeMeter:
    """While active, wraps ``torch.distributed.all_to_all_single`` (both implementations call it through the
    module attribute) to count the bytes each call sends to *other* ranks and the seconds spent in it,
    keyed by the current ``phase``.

    With ``barrier_first`` every exchange is preceded by a barrier on its group, timed into ``wait_seconds``:
    the time a rank waits for a slower one (load imbalance) is then not counted as exchange time.
    """

    def __init__(self, rt: Runtime, *, barrier_first: bool = False):
        self.rt = rt
        self.barrier_first = barrier_first
        self.phase = "step"
        self.payload_bytes = 0  # floating-point rows (tokens)
        self.meta_bytes = 0  # integer tensors (split counts)
        self.seconds: dict[str, float] = defaultdict(float)
        self.wait_seconds: dict[str, float] = defaultdict(float)
        self._original: Callable[..., Any] | None = None

    def reset(self) -> None:
        self.payload_bytes = self.meta_bytes = 0
        self.seconds = defaultdict(float)
        self.wait_seconds = defaultdict(float)

    def _count(self, tensor: torch.Tensor, in_splits: list[int] | None, group: Any) -> None:
        size, me = dist.get_world_size(group), dist.get_rank(group)
        row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
        if in_splits:
            sent = (sum(in_splits) - in_splits[me]) * row_bytes
        else:
            sent = tensor.numel() * tensor.element_size() * (size - 1) // size
        if tensor.is_floating_point():
            self.payload_bytes += sent
        else:
            self.meta_bytes += sent

    def __enter__(self) -> ExchangeMeter:
        original = dist.all_to_all_single
        self._original = original

        def metered(
            output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
        ):
            self._count(input, input_split_sizes, group)
            self.rt.sync()
            t0 = time.perf_counter()
            if self.barrier_first:
                dist.barrier(group=group)
                self.rt.sync()
                t1 = time.perf_counter()
                self.wait_seconds[self.phase] += t1 - t0
                t0 = t1
            work = original(
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
            )
            self.rt.sync()
            self.seconds[self.phase] += time.perf_counter() - t0
            return work

        dist.all_to_all_single = metered
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self._original


def minor_faults(fn: Callable[[], Any]) -> int:
    """Minor page faults of this process during one call: on CPU, each first touch of freshly mmap-ed pages
    (glibc serves every allocation of 32 MiB or more with a new mmap) costs one."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (the profiler's native start/stop lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(rt: Runtime, fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes allocated during one call of ``fn`` above what was live before it, CPU profiler or None)."""
    if rt.cuda:
        rt.sync()
        base = torch.cuda.memory_allocated(rt.device)
        torch.cuda.reset_peak_memory_stats(rt.device)
        fn()
        rt.sync()
        return torch.cuda.max_memory_allocated(rt.device) - base, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, prof


def op_profile(prof: Any, wall_s: float) -> dict[str, Any]:
    """Self CPU time by op (top ops and GEMM / all-to-all / other shares) of one profiled step."""
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    rows.sort(key=lambda r: r[1], reverse=True)
    gemm = sum(s for k, s, _ in rows if k in GEMM_OPS)
    a2a = sum(s for k, s, _ in rows if "alltoall" in k.lower().replace("_", ""))
    total = sum(s for _, s, _ in rows)
    return {
        "wall_s": wall_s,
        "self_cpu_s": total,
        "gemm_s": gemm,
        "all_to_all_s": a2a,
        "other_s": total - gemm - a2a,
        "top_ops": [{"op": k, "self_s": s, "calls": c} for k, s, c in rows[:PROFILE_TOP_OPS]],
    }


# ---------------------------------------------------------------------------------------------------------
# The two layers, built from the same weights


class SwiGLUExpert(nn.Module):
    """One SwiGLU expert for DeepSpeed's MoE, laid out like a moe_dist expert shard: w_gate_up [D, 2F], w_down [F, D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.zeros(dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.zeros(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w_gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down


def zipf_router_bias(weight_ED: torch.Tensor, *, top_k: int, ep: int) -> torch.Tensor:
    """Per-expert logit bias that makes top-k expert popularity follow Zipf(ZIPF_EXPONENT).

    Neither router has a bias, so the inputs carry a constant 1 in feature 0 and the bias goes into router
    weight column 0. Popularity ranks are dealt round-robin over the EP ranks (rank r → EP rank r mod P),
    so that the skew is between experts and not mostly between ranks. Calibrated on a fixed sample.
    """
    E, D = weight_ED.shape
    L = E // ep
    rank_of_expert = torch.empty(E)
    for r in range(E):
        rank_of_expert[(r % ep) * L + r // ep] = r
    target_E = (rank_of_expert + 1) ** -ZIPF_EXPONENT
    target_E = target_E / target_E.sum()
    gen = torch.Generator().manual_seed(SEED + 7)
    x_ND = torch.randn(16384, D, generator=gen)
    base_NE = x_ND[:, 1:] @ weight_ED.detach().float().cpu()[:, 1:].t()
    bias_E = torch.zeros(E)
    for _ in range(200):
        ids = (base_NE + bias_E).topk(top_k, dim=-1).indices
        share_E = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
        bias_E += 0.1 * (target_E.log() - share_E.clamp_min(1e-6).log())
        bias_E -= bias_E.mean()
    return bias_E


def build_moe_dist(case: Case, rt: Runtime, *, grouped_mm: str, bias_E: torch.Tensor | None) -> MoELayer:
    torch.manual_seed(SEED)  # the same global weights on every rank, then each keeps its shard
    cfg = MoEConfig(
        num_experts=case.num_experts,
        top_k=case.top_k,
        expert_hidden=case.hidden,
        capacity_factor=case.capacity_factor,
        aux_loss_coef=AUX_LOSS_COEF,
        z_loss_coef=0.0,  # DeepSpeed's gate has no z-loss
        grouped_mm=grouped_mm,
    )
    layer = MoELayer(case.dim, cfg)
    parallelize_moe(layer, rt.mesh)
    layer = layer.to(rt.device)
    if bias_E is not None:
        with torch.no_grad():
            layer.router.weight[:, 0] = bias_E
    return layer


def build_deepspeed(case: Case, rt: Runtime, ref: MoELayer) -> nn.Module:
    """DeepSpeed's MoE with moe_dist's settings and a copy of ``ref``'s router and local expert weights."""
    from deepspeed.moe.layer import MoE

    cf = case.capacity_factor
    moe = MoE(
        hidden_size=case.dim,
        expert=SwiGLUExpert(case.dim, case.hidden),
        num_experts=case.num_experts,
        ep_size=rt.mesh.ep,
        k=case.top_k,
        capacity_factor=cf or 1.0,
        eval_capacity_factor=cf or 1.0,
        min_capacity=0,  # moe_dist has no minimum: capacity = ceil(cf·T·K/E) in both
        noisy_gate_policy=None,
        drop_tokens=cf is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,  # the second expert is the arg-max, as in moe_dist
    )
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ref.router.weight)
        experts = moe.deepspeed_moe.experts.deepspeed_experts
        assert len(experts) == ref.experts.num_local_experts
        for i, expert in enumerate(experts):
            expert.w_gate_up.copy_(ref.experts.w_gate_up[i])
            expert.w_down.copy_(ref.experts.w_down[i])
    return moe.to(rt.device)


def _all_reduce_mean(params: list[nn.Parameter], group: Any, divisor: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divisor
    for p, synced in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = synced.view_as(p)


def deepspeed_grad_sync(moe: nn.Module, rt: Runtime) -> None:
    """What DeepSpeed's engine does for an MoE layer: expert grads over the expert-data-parallel group,
    the gate over the world (one flat all-reduce each, as moe_dist's sync_gradients)."""
    from deepspeed.utils import groups

    expert_params = list(moe.deepspeed_moe.experts.parameters())
    edp_group = groups._get_expert_data_parallel_group(moe.expert_group_name)
    if dist.get_world_size(edp_group) > 1:
        _all_reduce_mean(expert_params, edp_group, rt.world)
    _all_reduce_mean(list(moe.deepspeed_moe.gate.parameters()), None, rt.world)


def make_step(
    rt: Runtime, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, *, grad_sync: bool
) -> Callable[[], torch.Tensor]:
    """One fwd+bwd of ``layer``; returns its output."""
    is_moe_dist = isinstance(layer, MoELayer)

    def step() -> torch.Tensor:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with rt.autocast():
            if is_moe_dist:
                y = layer(x)
                aux = layer.stats.aux_loss
            else:
                y, aux, _ = layer(x)
            loss = (y.float() * g).sum() + AUX_LOSS_COEF * aux
        loss.backward()
        if grad_sync:
            if is_moe_dist:
                sync_gradients(layer, rt.mesh)
            else:
                deepspeed_grad_sync(layer, rt)
        return y

    return step


# ---------------------------------------------------------------------------------------------------------
# Measurements


class PhaseTimer:
    """``with timer("name"):`` records the seconds of the block and tells the meter which phase is running."""

    def __init__(self, rt: Runtime, meter: ExchangeMeter):
        self.rt, self.meter = rt, meter
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.meter.phase = name
        self.rt.sync()
        t0 = time.perf_counter()
        yield
        self.rt.sync()
        self.times[name] = time.perf_counter() - t0


def forward_phases(rt: Runtime, layer: MoELayer, x: torch.Tensor, *, steps: int) -> dict[str, float]:
    """moe_dist forward only, in a replica of MoELayer.forward with a timer around each sub-part.

    permute = dispatcher.dispatch minus its all-to-all (sort, the counts all-gather with the layer's one host
    sync, gather of the copies, received-row reorder); combine = dispatcher.combine minus its all-to-all
    (reverse reorder, gate-weighted sum); exchange = the all_to_all_single calls, each after a barrier;
    wait = those barriers (a rank waiting for a slower one). Each value: median over steps on each rank,
    then the mean over ranks.
    """
    local: dict[str, list[float]] = defaultdict(list)
    with ExchangeMeter(rt, barrier_first=True) as meter:
        for _ in range(steps):
            meter.reset()
            phase = PhaseTimer(rt, meter)
            dist.barrier()
            t_start = time.perf_counter()
            with rt.autocast():
                x_TD = x.reshape(-1, x.shape[-1])
                with phase("route"):
                    routing = layer.router(x_TD)
                with phase("dispatch"):
                    d = layer.dispatcher.dispatch(
                        x_TD,
                        routing.expert_ids_TK,
                        routing.weights_TK,
                        routing.counts_E,
                        capacity=layer.capacity(len(x_TD)),
                    )
                with phase("experts"):
                    y_RD = layer.experts(d.x_RD, d.tokens_per_expert_L, d.tokens_per_expert_host)
                with phase("combine"):
                    y_TD = layer.dispatcher.combine(y_RD, d).to(x.dtype)
            rt.sync()
            total = time.perf_counter() - t_start
            del y_TD
            times, a2a, wait = phase.times, meter.seconds, meter.wait_seconds
            local["route"].append(times["route"])
            local["permute"].append(times["dispatch"] - a2a["dispatch"] - wait["dispatch"])
            local["wait"].append(wait["dispatch"] + wait["combine"])
            local["exchange"].append(a2a["dispatch"] + a2a["combine"])
            local["experts"].append(times["experts"])
            local["combine"].append(times["combine"] - a2a["combine"] - wait["combine"])
            local["total"].append(total)
    names = list(local)
    medians = rt.rank_mean([statistics.median(local[n]) for n in names])
    return dict(zip(names, medians))


@dataclass
class Floor:
    """A floor measurement: ``run`` is timed alongside the layers' steps; ``work`` is FLOPs or bytes sent."""

    run: Callable[[], None]
    work: float
    info: dict[str, Any] = field(default_factory=dict)


def gemm_floor(rt: Runtime, case: Case) -> Floor:
    """Dense GEMMs at the experts' shapes: for each local expert the two forward GEMMs and the four backward
    GEMMs of a SwiGLU expert on R = P·T·K/E rows (the rows an expert gets under uniform routing)."""
    P, L = rt.mesh.ep, case.num_experts // rt.mesh.ep
    R, D, Fh = P * case.tokens * case.top_k // case.num_experts, case.dim, case.hidden
    gen = torch.Generator().manual_seed(SEED + 11)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(rt.device, rt.compute_dtype())

    x, h, dh, dy = rand(R, D), rand(R, Fh), rand(R, 2 * Fh), rand(R, D)
    w1, w2 = rand(L, D, 2 * Fh), rand(L, Fh, D)

    def run() -> None:
        for e in range(L):
            x @ w1[e]  # forward
            h @ w2[e]
            dy @ w2[e].t()  # backward of the down projection: dh, dW_down
            h.t() @ dy
            dh @ w1[e].t()  # backward of the gate/up projection: dx, dW_gate_up
            x.t() @ dh

    flops = L * 3 * (2 * R * D * 2 * Fh + 2 * R * Fh * D)
    return Floor(run, flops, {"gemm_rows_per_expert": R, "gemm_dtype": str(rt.compute_dtype())})


def a2a_floor(rt: Runtime, case: Case, dtype: torch.dtype) -> Floor | None:
    """all_to_all_single of the layer's dispatch size: T·K rows of D elements in the dtype the layer sends,
    evenly split; ``work`` = bytes leaving this rank."""
    if rt.mesh.ep == 1:
        return None
    P = rt.mesh.ep
    src = torch.randn(case.tokens * case.top_k, case.dim, device=rt.device).to(dtype)
    out = torch.empty_like(src)

    def run() -> None:
        dist.all_to_all_single(out, src, group=rt.mesh.ep_group)

    sent = src.numel() * src.element_size() * (P - 1) // P
    return Floor(run, sent, {"a2a_bytes": sent, "a2a_dtype": str(dtype)})


@dataclass
class Impl:
    name: str
    layer: nn.Module
    step: Callable[[], torch.Tensor]
    kept_copies: float = 0.0  # routed copies processed by experts, summed over ranks
    extra: dict[str, Any] = field(default_factory=dict)


def count_kept(rt: Runtime, impl: Impl, x: torch.Tensor) -> None:
    """Kept (not dropped) routed copies over all ranks; for DeepSpeed also its expert buffer capacity."""
    with torch.no_grad(), rt.autocast():
        if isinstance(impl.layer, MoELayer):
            impl.layer(x)
            st = impl.layer.stats
            impl.kept_copies = rt.rank_sum(st.num_copies - st.num_dropped)
            counts_E = st.counts_E.double()
        else:
            gate_out = impl.layer.deepspeed_moe.gate(x, None, True)
            capacity, indices_KT, counts_E = int(gate_out[1]), gate_out[3], gate_out[6].double()
            impl.kept_copies = rt.rank_sum(float((indices_KT >= 0).sum()))
            # Every local expert runs on P·capacity rows (padding included).
            impl.extra["capacity"] = capacity
            impl.extra["expert_rows_per_rank"] = (
                capacity * rt.mesh.ep * (impl.layer.num_experts // rt.mesh.ep)
            )
    dist.all_reduce(counts_E)
    impl.extra["max_over_mean_expert_load"] = (counts_E.max() / counts_E.mean()).item()


def measure_case(rt: Runtime, case: Case, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(SEED + 1000 * (rt.rank + 1))
    x = torch.randn(case.tokens, case.dim, generator=gen)
    g = torch.randn(case.tokens, case.dim, generator=gen)
    if case.routing == "zipf":
        x[:, 0] = 1.0  # the constant feature that carries the router bias
    x = x.to(rt.device).requires_grad_(True)
    g = g.to(rt.device)

    md = build_moe_dist(case, rt, grouped_mm="auto", bias_E=None)
    bias_E = None
    if case.routing == "zipf":
        bias_E = zipf_router_bias(md.router.weight, top_k=case.top_k, ep=rt.mesh.ep).to(rt.device)
        dist.broadcast(bias_E, src=0)  # identical on all ranks by construction; made certain
        with torch.no_grad():
            md.router.weight[:, 0] = bias_E
    impls = [Impl("moe_dist", md, make_step(rt, md, x, g, grad_sync=case.grad_sync))]
    if case.loop_variant:
        loop = build_moe_dist(case, rt, grouped_mm="off", bias_E=bias_E)
        impls.append(
            Impl("moe_dist_grouped_mm_off", loop, make_step(rt, loop, x, g, grad_sync=case.grad_sync))
        )
    dsl = build_deepspeed(case, rt, md)
    impls.append(Impl("deepspeed", dsl, make_step(rt, dsl, x, g, grad_sync=case.grad_sync)))

    for impl in impls:
        count_kept(rt, impl, x)
    outputs = {impl.name: impl.step().detach() for impl in impls}
    gemm, a2a = gemm_floor(rt, case), a2a_floor(rt, case, x.dtype)
    fns = {i.name: i.step for i in impls} | {"floor_gemm": gemm.run}
    if a2a is not None:
        fns["floor_a2a"] = a2a.run
    times = timed_steps(rt, fns, warmup=args.warmup, steps=args.steps)
    floors = {
        **gemm.info,
        "gemm_median_s": statistics.median(times["floor_gemm"]),
        "gemm_flops_per_s": gemm.work / statistics.median(times["floor_gemm"]),
        "gemm_best_flops_per_s": gemm.work / min(times["floor_gemm"]),
    }
    if a2a is not None:
        floors |= {
            **a2a.info,
            "a2a_median_s": statistics.median(times["floor_a2a"]),
            "a2a_bytes_per_s": a2a.work / statistics.median(times["floor_a2a"]),
        }

    P = rt.mesh.ep
    elem_bytes = x.element_size()  # both layers send rows in the input's dtype
    formula = 4 * case.top_k * case.dim * elem_bytes * (P - 1) / P
    result: dict[str, Any] = {
        "name": case.name,
        "shape": {
            "dim": case.dim,
            "hidden": case.hidden,
            "num_experts": case.num_experts,
            "top_k": case.top_k,
            "tokens_per_rank": case.tokens,
            "capacity_factor": case.capacity_factor,
            "routing": case.routing,
            "world": rt.world,
            "ep": P,
            "edp": rt.mesh.edp,
            "grad_sync": case.grad_sync,
        },
        "floors": floors,
    }
    for impl in impls:
        faults = minor_faults(impl.step)
        with ExchangeMeter(rt) as meter:
            t0 = time.perf_counter()
            peak, prof = peak_step_bytes(rt, impl.step)
            wall = time.perf_counter() - t0
        median = statistics.median(times[impl.name])
        useful = impl.kept_copies / rt.world * case.flops_per_copy() / median
        entry = {
            "median_s": median,
            "min_s": min(times[impl.name]),
            "tokens_per_s": case.tokens / median,
            "useful_flops_per_s": useful,
            "gemm_fraction": useful / floors["gemm_flops_per_s"],
            "peak_mem_bytes": int(max(rt.rank_max([float(peak)]))),
            "kept_copies_fraction": impl.kept_copies / (rt.world * case.tokens * case.top_k),
            "a2a_payload_bytes_per_token": max(rt.rank_max([meter.payload_bytes / case.tokens])),
            "a2a_meta_bytes_per_token": max(rt.rank_max([meter.meta_bytes / case.tokens])),
            "a2a_formula_bytes_per_token": formula,
            "minor_page_faults_per_step": max(rt.rank_max([float(faults)])),
            "step_times_s": times[impl.name],
            **impl.extra,
        }
        if prof is not None and rt.rank == 0:
            entry["profile_rank0"] = op_profile(prof, wall)
        if impl.name != "deepspeed":
            entry["max_abs_diff_vs_deepspeed"] = max(
                rt.rank_max([(outputs[impl.name].float() - outputs["deepspeed"].float()).abs().max().item()])
            )
        result[impl.name] = entry
    phases = forward_phases(rt, md, x, steps=args.steps)
    # The forward's expert GEMMs at the floor rate: a third of the fwd+bwd useful FLOPs.
    fwd_flops = impls[0].kept_copies / rt.world * case.flops_per_copy() / 3
    phases["expert_gemm_at_floor"] = fwd_flops / floors["gemm_flops_per_s"]
    result["moe_dist"]["phases_fwd_s"] = phases
    return result


# ---------------------------------------------------------------------------------------------------------
# Report


def machine_info(rt: Runtime, ds: ModuleType, *, loadavg_start: float) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "device": torch.cuda.get_device_name(rt.device) if rt.cuda else f"cpu ({os.cpu_count()} cores)",
        "cpu_model": cpu,
        "torch": torch.__version__,
        "deepspeed": ds.__version__,
        "backend": dist.get_backend(),
        "world": rt.world,
        "threads_per_rank": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "compute_dtype": str(rt.compute_dtype()),
        "moe_dist_source": source_version(),
        # 1-minute load average: other work on the machine shows up here (and in the timings).
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg()[0],
    }


def render(results: list[dict], machine: dict[str, Any]) -> str:
    def ms(s: float) -> str:
        return f"{s * 1e3:.1f}"

    lines = [
        f"moe_dist vs DeepSpeed MoE layer | {machine['device']} ({machine['cpu_model']}) | torch {machine['torch']} "
        f"| deepspeed {machine['deepspeed']} | world {machine['world']} | {machine['threads_per_rank']} thread(s)/rank "
        f"| load average at start / end: {machine['loadavg_start']:.2f} / {machine['loadavg_end']:.2f} "
        f"| source {machine['moe_dist_source']}",
        "",
        "| config | impl | median fwd+bwd ms | best ms | tokens/s/rank | useful GFLOP/s/rank | % of GEMM rate | peak MiB/rank "
        "| a2a B/token (measured / formula) | kept copies | page faults/step | |y - y_ds|max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    impl_names = ("moe_dist", "moe_dist_grouped_mm_off", "deepspeed")
    for r in results:
        for name in impl_names:
            if name not in r:
                continue
            e = r[name]
            diff = e.get("max_abs_diff_vs_deepspeed")
            lines.append(
                f"| {r['name']} | {name} | {ms(e['median_s'])} | {ms(e['min_s'])} | {e['tokens_per_s']:,.0f} | "
                f"{e['useful_flops_per_s'] / 1e9:.1f} | {100 * e['gemm_fraction']:.0f}% | "
                f"{e['peak_mem_bytes'] / 2**20:.0f} | {e['a2a_payload_bytes_per_token']:,.0f} / "
                f"{e['a2a_formula_bytes_per_token']:,.0f} | {100 * e['kept_copies_fraction']:.1f}% | "
                f"{e['minor_page_faults_per_step']:,.0f} | "
                f"{'' if diff is None else f'{diff:.1e}'} |"
            )
    lines += [
        "",
        "| config | moe_dist / DeepSpeed tokens/s | moe_dist / DeepSpeed peak mem | DeepSpeed capacity (rows/expert/rank) "
        "| max/mean expert load |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        md, dsr = r["moe_dist"], r["deepspeed"]
        lines.append(
            f"| {r['name']} | {md['tokens_per_s'] / dsr['tokens_per_s']:.2f}x | "
            f"{md['peak_mem_bytes'] / dsr['peak_mem_bytes']:.2f}x | {dsr.get('capacity', '')} | "
            f"{md['max_over_mean_expert_load']:.2f} |"
        )
    lines += [
        "",
        "| config | GEMM rows/expert | GEMM GFLOP/s/rank (median / best) | a2a MiB sent per call | a2a GB/s/rank |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        f = r["floors"]
        a2a = (
            f"{f['a2a_bytes'] / 2**20:.1f} | {f['a2a_bytes_per_s'] / 1e9:.2f}"
            if "a2a_bytes" in f
            else "- | -"
        )
        lines.append(
            f"| {r['name']} | {f['gemm_rows_per_expert']} | {f['gemm_flops_per_s'] / 1e9:.1f} / "
            f"{f['gemm_best_flops_per_s'] / 1e9:.1f} | {a2a} |"
        )
    lines += [
        "",
        "moe_dist forward-only breakdown (ms; median over steps, mean over ranks). exchange = the "
        "all_to_all_single calls after a barrier; wait = that barrier (waiting for the slower rank). "
        "GEMM@floor = the forward's expert FLOPs at the measured GEMM rate; the last column is everything "
        "but that and the exchange.",
        "",
        "| config | route | permute | wait | exchange | experts | combine | total fwd | GEMM@floor "
        "| route+permute+combine | not GEMM@floor, not exchange |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["moe_dist"]["phases_fwd_s"]
        glue = (p["route"] + p["permute"] + p["combine"]) / p["total"]
        rest = 1 - (p["expert_gemm_at_floor"] + p["exchange"]) / p["total"]
        lines.append(
            f"| {r['name']} | {ms(p['route'])} | {ms(p['permute'])} | {ms(p['wait'])} | {ms(p['exchange'])} | "
            f"{ms(p['experts'])} | {ms(p['combine'])} | {ms(p['total'])} | {ms(p['expert_gemm_at_floor'])} | "
            f"{100 * glue:.0f}% | {100 * rest:.0f}% |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    parser.add_argument("--configs", default="A,B,C", help="comma-separated config letters: A, B, C, D")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per implementation (>= 10 to report)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="for the equal-capacity variants")
    parser.add_argument(
        "--ep", type=int, default=None, help="expert-parallel degree (default: min(2, world))"
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.tokens < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --tokens >= 1")
    return args


def main() -> None:
    args = parse_args()
    letters = [c.strip().upper() for c in args.configs.split(",") if c.strip()]
    rt = init_runtime(ep=args.ep, num_experts=8)
    ds = load_deepspeed(rt)
    t_start, loadavg_start = time.perf_counter(), os.getloadavg()[0]
    cases = build_cases(letters, tokens=args.tokens, capacity_factor=args.capacity_factor, world=rt.world)
    results = []
    for case in cases:
        results.append(measure_case(rt, case, args))
        if rt.rank == 0:
            md, dsr = results[-1]["moe_dist"], results[-1]["deepspeed"]
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {case.name}: moe_dist {md['median_s'] * 1e3:.1f} ms, "
                f"deepspeed {dsr['median_s'] * 1e3:.1f} ms",
                flush=True,
            )
    if rt.rank == 0:
        machine = machine_info(rt, ds, loadavg_start=loadavg_start)
        print()
        print(render(results, machine))
        print(f"\nbench_moe: {time.perf_counter() - t_start:.0f}s for {len(cases)} cases")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "machine": machine,
                "args": {k: str(v) for k, v in vars(args).items()},
                "runtime_s": time.perf_counter() - t_start,
                "configs": results,
            }
            args.json.write_text(json.dumps(payload, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
