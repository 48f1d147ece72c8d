"""Benchmark of one MoE layer: moe_dist against deepspeed.moe.layer.MoE, with the machine's floors.

    torchrun --nproc_per_node 2 scripts/bench_moe.py [--json PATH] [--configs A,B,C] [--steps N] [--warmup N]

Both implementations run in one process group on the same inputs with the same router and expert weights.
A step is fwd+bwd of ``loss = Σ(y·g) + 0.01·aux`` for a fixed random ``g`` (the input needs a gradient too);
the ranks meet at a barrier before every timed step, a step's time is the slowest rank's, and the two
implementations alternate step by step so that both see the same machine. The dropless cases also time
moe_dist with the chunked EP pipeline (model.moe.overlap_chunks=2) and report the fraction of the exchange
it hides. In the same run the script measures the floors: dense GEMM FLOP/s at the experts' shapes and
all_to_all_single bandwidth at the layer's dispatch size.

CPU / gloo: fp32; peak memory is the peak of cumulative allocated bytes over one step, from the memory
events of ``torch.profiler.profile(profile_memory=True)``, plus the peak of moe_dist's row-buffer cache
(not torch allocations; the sum is an upper bound). CUDA / NCCL (same script, unchanged): bf16
autocast, ``torch.cuda.synchronize`` around every timer, peak memory from ``torch.cuda.max_memory_allocated``.
Both count bytes allocated during the step (activations, temporaries, gradients), not the weights.

Legend: T tokens per rank, D model dim, F expert hidden dim, E experts, K experts per token,
P expert-parallel ranks, L = E / P local experts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_common import (
    ExchangeMeter,
    PhaseClock,
    Runtime,
    a2a_floor,
    init_runtime,
    linear_gemm_floor,
    machine_info,
    minor_faults,
    op_profile,
    peak_step_bytes,
    timed_steps,
)
from bench_moe_layers import (
    SEED,
    Case,
    Impl,
    build_deepspeed,
    build_moe_dist,
    count_kept,
    load_deepspeed,
    make_step,
    zipf_router_bias,
)
from bench_moe_report import render

from moe_dist import MoELayer

SHAPE_A = {"dim": 256, "hidden": 1024, "num_experts": 8, "top_k": 2}  # also C and D
SHAPE_B = {"dim": 256, "hidden": 256, "num_experts": 64, "top_k": 8}  # fine-grained
CHUNKS = 2  # the chunked EP pipeline variant of the dropless cases (model.moe.overlap_chunks)


def build_cases(
    letters: list[str], *, tokens: int, capacity_factor: float, world: int, rt_ep: int
) -> list[Case]:
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
                    chunks_variant=CHUNKS if rt_ep > 1 else 0,
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


def forward_phases(rt: Runtime, layer: MoELayer, x: torch.Tensor, *, steps: int) -> dict[str, float]:
    """moe_dist forward only, in a replica of MoELayer.forward with a timer around each sub-part.

    permute = dispatcher.dispatch minus its all-to-all (sort, the counts all-gather with the layer's one host
    sync, gather of the copies into the send buffer); combine = dispatcher.combine minus its all-to-all
    (the fused gate-weighted sum); exchange = the all_to_all_single calls, each after a barrier;
    wait = those barriers (a rank waiting for a slower one). Each value: median over steps on each rank,
    then the mean over ranks.
    """
    local: dict[str, list[float]] = defaultdict(list)
    with ExchangeMeter(rt, barrier_first=True) as meter:
        for _ in range(steps):
            meter.reset()
            phase = PhaseClock(rt.device, on_phase=lambda name: setattr(meter, "phase", name))
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
                    y_RD = layer.experts(d.x_RD, d.rows)
                with phase("combine"):
                    y_TD = layer.dispatcher.combine(y_RD, d).to(x.dtype)
            rt.sync()
            total = time.perf_counter() - t_start
            del y_TD
            times, a2a, wait = phase.seconds, meter.seconds, meter.wait_seconds
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


def expert_gemm_floor(rt: Runtime, case: Case):
    """Dense GEMMs at the experts' shapes: each local expert's two linear maps (fwd and both bwd products) on
    R = P·T·K/E rows, the rows an expert gets under uniform routing."""
    P, L = rt.mesh.ep, case.num_experts // rt.mesh.ep
    R = P * case.tokens * case.top_k // case.num_experts
    shapes = [(R, case.dim, 2 * case.hidden), (R, case.hidden, case.dim)] * L
    floor = linear_gemm_floor(shapes, device=rt.device, dtype=rt.compute_dtype())
    floor.info["gemm_rows_per_expert"] = R
    return floor


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
    if case.chunks_variant > 1:
        chunked = build_moe_dist(
            case, rt, grouped_mm="auto", bias_E=bias_E, overlap_chunks=case.chunks_variant
        )
        impls.append(Impl("moe_dist_chunks", chunked, make_step(rt, chunked, x, g, grad_sync=case.grad_sync)))
    dsl = build_deepspeed(case, rt, md)
    impls.append(Impl("deepspeed", dsl, make_step(rt, dsl, x, g, grad_sync=case.grad_sync)))

    for impl in impls:
        count_kept(rt, impl, x)
    outputs = {impl.name: impl.step().detach() for impl in impls}
    gemm = expert_gemm_floor(rt, case)
    a2a = a2a_floor(rt, rows=case.tokens * case.top_k, dim=case.dim, dtype=x.dtype)
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
    if "moe_dist_chunks" in result:
        # Exchange time of a plain step, fwd+bwd: twice the forward's (barrier-separated) all-to-all time.
        saved = result["moe_dist"]["median_s"] - result["moe_dist_chunks"]["median_s"]
        result["moe_dist_chunks"]["exchange_hidden_fraction"] = saved / (2 * phases["exchange"])
    return result


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
    cases = build_cases(
        letters, tokens=args.tokens, capacity_factor=args.capacity_factor, world=rt.world, rt_ep=rt.mesh.ep
    )
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
        machine = machine_info(rt, loadavg_start=loadavg_start, deepspeed=ds.__version__)
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
