"""What the benchmarks share: the runtime (device, process group, rank reductions), timers, the all-to-all
meter, memory and profile readers, the machine's floors (GEMM rate, all-to-all bandwidth) and the record
of the code and machine measured. scripts/ is on sys.path when a benchmark runs.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_dist import build_mesh
from moe_dist.memory import AllocatorPeak
from moe_dist.parallel.mesh import Mesh

PROFILE_TOP_OPS = 12
GEMM_OPS = frozenset(
    {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::_grouped_mm"}
)


def source_version() -> str:
    """The checkout's commit, with "+dirty" when moe_dist/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "moe_dist"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------------------
# Timers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """``with clock("name"):`` adds the block's seconds to ``seconds[name]`` (synchronising CUDA at both ends)
    and tells ``on_phase`` (if any) which phase is running. Usable as a trainer phase hook."""

    def __init__(self, device: torch.device, *, on_phase: Callable[[str], None] | None = None):
        self.device, self.on_phase = device, on_phase
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = True

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.on_phase is not None:
            self.on_phase(name)
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] += time.perf_counter() - t0


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, after a barrier (all ranks run it at the same time)."""
    if dist.is_initialized():
        dist.barrier()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Runtime: device, process group, rank reductions


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
    with quiet_stderr(), AllocatorPeak(rt.device) as peak:
        fn()
    return peak.bytes, peak.profile


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
# Floors: what this machine can do at the benchmarked shapes, measured in the same run


@dataclass
class Floor:
    """A floor measurement: ``run`` is timed alongside the benchmarked steps; ``work`` is FLOPs or bytes sent."""

    run: Callable[[], None]
    work: float
    info: dict[str, Any] = field(default_factory=dict)


def linear_gemm_floor(
    shapes: list[tuple[int, int, int]], *, device: torch.device, dtype: torch.dtype
) -> Floor:
    """Dense GEMMs of linear maps ``(rows, in, out)``: for each, the forward ``x @ w`` and the two backward
    products (``dy @ wᵀ`` for the input gradient, ``xᵀ @ dy`` for the weight gradient)."""
    gen = torch.Generator().manual_seed(11)
    operands = [
        (
            torch.randn(r, k, generator=gen).to(device, dtype),
            torch.randn(k, n, generator=gen).to(device, dtype),
            torch.randn(r, n, generator=gen).to(device, dtype),
        )
        for r, k, n in shapes
    ]

    def run() -> None:
        for x, w, dy in operands:
            x @ w
            dy @ w.t()
            x.t() @ dy

    return Floor(run, sum(3 * 2 * r * k * n for r, k, n in shapes), {"gemm_dtype": str(dtype)})


def a2a_floor(rt: Runtime, *, rows: int, dim: int, dtype: torch.dtype) -> Floor | None:
    """all_to_all_single of ``rows`` rows of ``dim`` elements, evenly split over the EP group; ``work`` =
    bytes leaving this rank (None without an EP group)."""
    if rt.mesh.ep == 1:
        return None
    P = rt.mesh.ep
    src = torch.randn(rows, dim, device=rt.device).to(dtype)
    out = torch.empty_like(src)

    def run() -> None:
        dist.all_to_all_single(out, src, group=rt.mesh.ep_group)

    sent = src.numel() * src.element_size() * (P - 1) // P
    return Floor(run, sent, {"a2a_bytes": sent, "a2a_dtype": str(dtype)})


# ---------------------------------------------------------------------------------------------------------
# The record of the machine


def machine_info(rt: Runtime, *, loadavg_start: float, **versions: str) -> dict[str, Any]:
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
        **versions,
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
