"""Training-step benchmark of the default model: tokens/s, achieved FLOP/s against the GEMM rate, the
framework's overhead outside model fwd/bwd and the optimizer, and what the speed options buy.

    python scripts/bench_train.py [--json PATH] [--steps N] [--warmup N] [--variants LIST] [key=value ...]
    torchrun --nproc_per_node 2 scripts/bench_train.py [--json PATH] [--variants LIST] [key=value ...]

``key=value`` are Hydra overrides of configs/config.yaml (the default model is configs/model/small_moe.yaml);
``parallel.ep`` defaults to the world size. Each step is moe_dist.trainer.train_step itself, its phases timed
through the step's phase hook (no logging, eval, checkpoints or watchdog thread). Overhead = data (lr, seed,
batch, prefetch) + stats + reduce_gradients (the exposed gradient sync and the exact norm) + non-finite
check + stats sync; the model phases are forward, backward and optimizer (clip, AdamW, zero_grad). On CUDA
every timer synchronises the device, which removes some overlap; on CPU the timers are exact.

``--variants`` (default: ``default``) runs several configurations in one process, their steps alternating
(each round starts with the next variant) so that all see the same machine: ``default`` (the overrides as given), ``no_grad_overlap``
(engine.overlap_grad_sync=false), ``compile`` (trainer.compile=true), ``chunks2`` (model.moe.overlap_chunks=2).
With ``default`` and ``no_grad_overlap`` together, the fraction of the gradient all-reduce hidden behind
backward is 1 − exposed sync time with overlap / sync time without (sync time = reduce_gradients minus the
grad norm, timed separately).

Model FLOPs per token = 6 · (active parameters without the embedding lookup; a tied embedding is the head)
+ 6 · n_layers · n_heads · head_dim · S (``moe_dist.model.transformer.model_flops_per_token``). The GEMM rate is measured in the same run, between
the steps, on this model's GEMM shapes (every linear map of one micro-batch: forward and both backward
products, experts at their uniform-routing row counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_common import Floor, PhaseClock, linear_gemm_floor, source_version, timed

from moe_dist.config import Config, batch_layout
from moe_dist.distributed import env_world_size
from moe_dist.engines import native
from moe_dist.model.transformer import count_parameters, head_dim, kv_heads, model_flops_per_token
from moe_dist.parallel.apply import global_grad_norm
from moe_dist.parallel.mesh import Mesh
from moe_dist.trainer import STEP_PHASES, build_run, train_step

# Phases outside model fwd/bwd and the optimizer (clip + AdamW + zero_grad): the framework's overhead.
MODEL_PHASES = ("forward", "backward", "optimizer")
OVERHEAD_PHASES = tuple(p for p in STEP_PHASES if p not in MODEL_PHASES)


def compose_config(overrides: list[str], *, world: int) -> Config:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_dist.train import CONFIG_DIR  # registers the schemas and resolvers

    if not any(o.startswith("parallel.ep=") for o in overrides):
        overrides = [f"parallel.ep={world}", *overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(
            compose(config_name="config", overrides=["trainer.progress_bar=false", *overrides])
        )


def gemm_floors(cfg: Config, mesh: Mesh, device: torch.device) -> dict[str, Floor]:
    """This model's GEMMs for one micro-batch on this rank (every linear map: forward and both backward
    products, experts at their uniform-routing row counts), and one 1024³ GEMM."""
    m, moe = cfg.model, cfg.model.moe
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M = batch_layout(cfg.trainer, world_size=mesh.world_size)[0] * m.seq_len  # rows of one micro-batch
    shapes: list[tuple[int, int, int]] = []  # (rows, in, out)
    for i in range(m.n_layers):
        q_dim, kv_dim = m.n_heads * head_dim(m), kv_heads(m) * head_dim(m)
        shapes += [(M, m.dim, q_dim), (M, m.dim, kv_dim), (M, m.dim, kv_dim), (M, q_dim, m.dim)]  # q, k, v, o
        if moe.num_experts > 0 and i % moe.every_n_layers == 0:
            shapes.append((M, m.dim, moe.num_experts))  # router
            rows = M * moe.top_k // moe.num_experts * mesh.ep  # per local expert, uniform routing
            for _ in range(moe.num_experts // mesh.ep):
                shapes += [(rows, m.dim, 2 * moe.expert_hidden), (rows, moe.expert_hidden, m.dim)]
            if moe.num_shared_experts:
                hidden = moe.num_shared_experts * moe.expert_hidden
                shapes += [(M, m.dim, hidden)] * 2 + [(M, hidden, m.dim)]
        else:
            shapes += [(M, m.dim, m.ffn_hidden)] * 2 + [(M, m.ffn_hidden, m.dim)]
    shapes.append((M, m.dim, m.vocab_size))  # output head
    big = torch.randn(1024, 1024).to(device, dtype)
    return {
        "model_gemm": linear_gemm_floor(shapes, device=device, dtype=dtype),
        "square_1024_gemm": Floor(lambda: big @ big, 2 * 1024**3),
    }


VARIANTS = {
    "default": [],
    "no_grad_overlap": ["engine.overlap_grad_sync=false"],
    "compile": ["trainer.compile=true"],
    "chunks2": ["model.moe.overlap_chunks=2"],
}


def run(cfgs: dict[str, Config], *, warmup: int, steps: int) -> dict[str, Any]:
    """Builds one training run per variant and alternates their steps; returns the measurements."""
    loadavg_start = os.getloadavg()[0]
    trainings = {name: build_run(cfg) for name, cfg in cfgs.items()}
    first = next(iter(trainings.values()))
    mesh, device = first.mesh, first.device
    clocks = {name: PhaseClock(device) for name in trainings}
    timing = {"clock": None}  # the clock of the step running now (the grad norm reports into it)

    def timed_norm(*args, **kwargs):
        with timing["clock"]("grad_norm"):
            return global_grad_norm(*args, **kwargs)

    native.global_grad_norm = timed_norm  # the norm is timed apart from the gradient sync
    floors = gemm_floors(first.cfg, mesh, device)
    floor_times: dict[str, list[float]] = {name: [] for name in floors}
    step_times: dict[str, list[float]] = {name: [] for name in trainings}
    order = list(trainings)
    for step in range(1, warmup + steps + 1):
        # The variants take turns going first (the floors run just before the first of each round).
        for name in order[step % len(order) :] + order[: step % len(order)]:
            training = trainings[name]
            clock = clocks[name]
            clock.enabled = step > warmup
            timing["clock"] = clock
            t_step = time.perf_counter()
            train_step(training, step, phase=clock)  # the trainer's step, each phase timed
            sync = getattr(training.engine, "overlap", None)
            if clock.enabled and sync is not None and training.engine.overlap_grad_sync:
                clock.seconds["grad_sync_wait"] += sync.wait_s  # host time waiting for the buckets
            with clock("stats_sync"):
                if step % training.cfg.trainer.log_every == 0:  # what the trainer reads on its logging steps
                    training.stats.record()
                    training.collapse.new_warnings()
                training.stats.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step > warmup:
                step_times[name].append(time.perf_counter() - t_step)
        # The floors run between steps, so that they see the same machine as the steps.
        for name, floor in floors.items():
            seconds = timed(floor.run, device)
            if step > warmup:
                floor_times[name].append(seconds)
    native.global_grad_norm = global_grad_norm

    floor_rates = {
        f"{n}_flops_per_s": floors[n].work / statistics.median(ts) for n, ts in floor_times.items()
    }
    names = [*MODEL_PHASES, *OVERHEAD_PHASES, "grad_norm", "grad_sync_wait"]
    per_variant = []
    for name in trainings:
        per_step = [clocks[name].seconds[n] / steps for n in names]
        times = step_times[name]
        per_variant += [*per_step, sum(times) / steps, statistics.median(times)]
    gathered = torch.tensor([*per_variant, *floor_rates.values()], dtype=torch.float64, device=device)
    if mesh.world_group is not None:
        dist.all_reduce(gathered)
        gathered /= mesh.world_size
    values = gathered.tolist()
    floor_values = dict(zip(floor_rates, values[len(per_variant) :]))

    tokens_per_step = first.cfg.trainer.global_batch_size * first.cfg.model.seq_len
    flops_per_token = model_flops_per_token(first.model)
    results = {}
    width = len(names) + 2
    for i, (name, training) in enumerate(trainings.items()):
        row = values[i * width : (i + 1) * width]
        phases = dict(zip(names, row[: len(names)]))
        grad_norm = phases.pop("grad_norm")
        grad_sync_wait = phases.pop("grad_sync_wait")
        mean_step, median_step = row[len(names)], row[len(names) + 1]
        achieved = flops_per_token * tokens_per_step / mesh.world_size / mean_step
        overhead = sum(phases[n] for n in OVERHEAD_PHASES)
        results[name] = {
            "overrides": VARIANTS[name],
            "step_mean_s": mean_step,
            "step_median_s": median_step,
            "tokens_per_s": tokens_per_step / mean_step,
            "tokens_per_s_per_rank": tokens_per_step / mesh.world_size / mean_step,
            "achieved_flops_per_s_per_rank": achieved,
            "model_gemm_fraction": achieved / floor_values["model_gemm_flops_per_s"],
            "phases_s": phases,
            "grad_norm_s": grad_norm,
            "grad_sync_s": phases["reduce_gradients"] - grad_norm,  # exposed all-reduce and its wait
            "unaccounted_s": mean_step - sum(phases.values()),
            "overhead_s": overhead,
            "overhead_fraction": overhead / mean_step,
            # The issue's definition: everything but model compute and communication (the buckets' exposed
            # wait; measurable with the overlapped sync only).
            "grad_sync_wait_s": grad_sync_wait,
            "overhead_without_comm_fraction": (overhead - grad_sync_wait) / mean_step,
            "buckets": len(training.engine.overlap.buckets)
            if getattr(training.engine, "overlap", None)
            else 0,
        }
    if "default" in results and "no_grad_overlap" in results:
        on, off = results["default"]["grad_sync_s"], results["no_grad_overlap"]["grad_sync_s"]
        results["default"]["grad_sync_hidden_fraction"] = 1 - on / off if off > 0 else None
    return {
        "world": mesh.world_size,
        "ep": mesh.ep,
        "edp": mesh.edp,
        "device": str(device),
        "threads_per_rank": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "moe_dist_source": source_version(),
        "params": count_parameters(first.model),
        "tokens_per_step": tokens_per_step,
        "micro_batches_per_rank": first.accum_steps,
        "steps": steps,
        "model_flops_per_token": flops_per_token,
        **floor_values,
        "variants": results,
        # 1-minute load average: other work on the machine shows up here (and in the timings).
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg()[0],
        "config": dataclasses.asdict(first.cfg),
    }


def render(r: dict[str, Any]) -> str:
    name, v = next(iter(r["variants"].items()))
    step = v["step_mean_s"]
    lines = [
        f"bench_train | world {r['world']} (ep {r['ep']} x edp {r['edp']}) | {r['device']} | "
        f"{r['threads_per_rank']} thread(s)/rank | torch {r['torch']} | "
        f"{r['params']['total'] / 1e6:.2f}M params, {r['params']['active'] / 1e6:.2f}M active | "
        f"{r['tokens_per_step']} tokens/step, {r['micro_batches_per_rank']} micro-batch(es)/rank | {r['steps']} steps "
        f"| load average at start / end: {r['loadavg_start']:.2f} / {r['loadavg_end']:.2f} "
        f"| source {r['moe_dist_source']}",
        "",
        f"variant {name}:",
        "",
        "| tokens/s (all ranks) | tokens/s/rank | step ms (mean / median) | achieved GFLOP/s/rank "
        "| model-GEMM GFLOP/s/rank | % of GEMM rate | 1024³ GEMM GFLOP/s/rank | framework overhead |",
        "|---|---|---|---|---|---|---|---|",
        f"| {v['tokens_per_s']:,.0f} | {v['tokens_per_s_per_rank']:,.0f} | {step * 1e3:.1f} / "
        f"{v['step_median_s'] * 1e3:.1f} | {v['achieved_flops_per_s_per_rank'] / 1e9:.1f} | "
        f"{r['model_gemm_flops_per_s'] / 1e9:.1f} | {100 * v['model_gemm_fraction']:.0f}% | "
        f"{r['square_1024_gemm_flops_per_s'] / 1e9:.1f} | {100 * v['overhead_fraction']:.1f}% "
        f"({100 * v['overhead_without_comm_fraction']:.1f}% without the all-reduce wait) |",
        "",
        "| phase | ms/step (mean over ranks) | share of step |",
        "|---|---|---|",
    ]
    for phase, seconds in v["phases_s"].items():
        tag = " (overhead)" if phase in OVERHEAD_PHASES else ""
        lines.append(f"| {phase}{tag} | {seconds * 1e3:.2f} | {100 * seconds / step:.1f}% |")
        if phase == "reduce_gradients":
            lines.append(
                f"| - of which grad norm | {v['grad_norm_s'] * 1e3:.2f} | {100 * v['grad_norm_s'] / step:.1f}% |"
            )
            wait = v["grad_sync_wait_s"]
            lines.append(
                f"| - of which waiting for the all-reduce | {wait * 1e3:.2f} | {100 * wait / step:.1f}% |"
            )
    lines.append(f"| unaccounted | {v['unaccounted_s'] * 1e3:.2f} | {100 * v['unaccounted_s'] / step:.1f}% |")
    if len(r["variants"]) > 1:
        lines += [
            "",
            "| variant | tokens/s (all ranks) | step ms (mean / median) | vs first | overhead | overhead w/o comm wait "
            "| grad sync ms (exposed) | of which waiting ms | forward ms | backward ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for other, o in r["variants"].items():
            lines.append(
                f"| {other} | {o['tokens_per_s']:,.0f} | {o['step_mean_s'] * 1e3:.1f} / {o['step_median_s'] * 1e3:.1f} "
                f"| {step / o['step_mean_s']:.2f}x | {100 * o['overhead_fraction']:.1f}% | "
                f"{100 * o['overhead_without_comm_fraction']:.1f}% | "
                f"{o['grad_sync_s'] * 1e3:.2f} | {o['grad_sync_wait_s'] * 1e3:.2f} | {o['phases_s']['forward'] * 1e3:.1f} | "
                f"{o['phases_s']['backward'] * 1e3:.1f} |"
            )
    hidden = r["variants"].get("default", {}).get("grad_sync_hidden_fraction")
    if hidden is not None:
        lines += [
            "",
            f"gradient all-reduce hidden behind backward: {100 * hidden:.0f}% (default vs no_grad_overlap)",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON to this path")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument(
        "--variants",
        default="default",
        help=f"comma-separated, from {', '.join(VARIANTS)} (the first is the main table)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.dim=256 parallel.ep=1")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants={args.variants!r}: choose from {', '.join(VARIANTS)}")
    world = env_world_size()
    cfgs = {v: compose_config([*args.overrides, *VARIANTS[v]], world=world) for v in variants}
    result = run(cfgs, warmup=args.warmup, steps=args.steps)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(render(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
