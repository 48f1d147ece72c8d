"""Training-step benchmark of the default model: tokens/s, achieved FLOP/s against the GEMM rate, and the
framework's overhead outside model fwd/bwd and the optimizer.

    python scripts/bench_train.py [--json PATH] [--steps N] [--warmup N] [key=value ...]
    torchrun --nproc_per_node 2 scripts/bench_train.py [--json PATH] [key=value ...]

``key=value`` are Hydra overrides of configs/config.yaml (the default model is configs/model/small_moe.yaml);
``parallel.ep`` defaults to the world size. Each step is moe_dist.trainer.train_step itself, its phases timed
through the step's phase hook (no logging, eval, checkpoints or watchdog thread). Overhead = data (lr, seed,
batch) + stats + reduce_gradients (gradient sync and exact norm) + non-finite check + stats sync; the model
phases are forward, backward and optimizer (clip, AdamW, zero_grad). On CUDA every timer synchronises the
device, which removes some overlap; on CPU the timers are exact.

Model FLOPs per token = 6 · (active parameters without the embedding table) + 6 · n_layers · D · S
(causal attention, QKᵀ and AV, fwd+bwd, half the S×S square). The GEMM rate is measured in the same run,
between the steps, on this model's GEMM shapes (every linear map of one micro-batch: forward and both
backward products, experts at their uniform-routing row counts).
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
from moe_dist.model.transformer import Transformer, count_parameters, head_dim, kv_heads
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


def model_flops_per_token(model: Transformer) -> float:
    cfg = model.cfg
    # The embedding lookup is no matmul; a tied embedding still is the head's.
    lookup = model.tok_embeddings.weight.numel() if model.output is not None else 0
    active = count_parameters(model)["active"] - lookup
    return 6 * active + 6 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * cfg.seq_len


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


def run(cfg: Config, *, warmup: int, steps: int) -> dict[str, Any]:
    loadavg_start = os.getloadavg()[0]
    training = build_run(cfg)
    t, mesh, device = cfg.trainer, training.mesh, training.device
    clock = PhaseClock(device)
    floors = gemm_floors(cfg, mesh, device)
    floor_times: dict[str, list[float]] = {name: [] for name in floors}
    step_times = []
    for step in range(1, warmup + steps + 1):
        clock.enabled = step > warmup
        t_step = time.perf_counter()
        train_step(training, step, phase=clock)  # the trainer's step, each phase timed
        with clock("stats_sync"):
            if step % t.log_every == 0:  # what the trainer reads on its logging steps
                training.stats.record()
                training.collapse.new_warnings()
            training.stats.reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > warmup:
            step_times.append(time.perf_counter() - t_step)
        # The floors run between steps, so that they see the same machine as the steps.
        for name, floor in floors.items():
            seconds = timed(floor.run, device)
            if step > warmup:
                floor_times[name].append(seconds)

    floor_rates = {
        f"{n}_flops_per_s": floors[n].work / statistics.median(ts) for n, ts in floor_times.items()
    }
    names = [*MODEL_PHASES, *OVERHEAD_PHASES]
    per_step = [clock.seconds[n] / steps for n in names]
    mean_step = sum(step_times) / steps
    gathered = torch.tensor(
        [*per_step, mean_step, statistics.median(step_times), *floor_rates.values()],
        dtype=torch.float64,
        device=device,
    )
    if mesh.world_group is not None:
        dist.all_reduce(gathered)
        gathered /= mesh.world_size
    values = gathered.tolist()
    phases = dict(zip(names, values[: len(names)]))
    mean_step, median_step = values[len(names)], values[len(names) + 1]
    floor_values = dict(zip(floor_rates, values[len(names) + 2 :]))

    tokens_per_step = t.global_batch_size * cfg.model.seq_len
    flops_per_token = model_flops_per_token(training.model)
    achieved = flops_per_token * tokens_per_step / mesh.world_size / mean_step
    overhead = sum(phases[n] for n in OVERHEAD_PHASES)
    return {
        "world": mesh.world_size,
        "ep": mesh.ep,
        "edp": mesh.edp,
        "device": str(device),
        "threads_per_rank": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "moe_dist_source": source_version(),
        "params": count_parameters(training.model),
        "tokens_per_step": tokens_per_step,
        "micro_batches_per_rank": training.accum_steps,
        "steps": steps,
        "step_mean_s": mean_step,
        "step_median_s": median_step,
        "tokens_per_s": tokens_per_step / mean_step,
        "tokens_per_s_per_rank": tokens_per_step / mesh.world_size / mean_step,
        "model_flops_per_token": flops_per_token,
        "achieved_flops_per_s_per_rank": achieved,
        **floor_values,
        "model_gemm_fraction": achieved / floor_values["model_gemm_flops_per_s"],
        "phases_s": phases,
        "unaccounted_s": mean_step - sum(phases.values()),
        "overhead_s": overhead,
        "overhead_fraction": overhead / mean_step,
        # 1-minute load average: other work on the machine shows up here (and in the timings).
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg()[0],
        "config": dataclasses.asdict(cfg),
    }


def render(r: dict[str, Any]) -> str:
    step = r["step_mean_s"]
    lines = [
        f"bench_train | world {r['world']} (ep {r['ep']} x edp {r['edp']}) | {r['device']} | "
        f"{r['threads_per_rank']} thread(s)/rank | torch {r['torch']} | "
        f"{r['params']['total'] / 1e6:.2f}M params, {r['params']['active'] / 1e6:.2f}M active | "
        f"{r['tokens_per_step']} tokens/step, {r['micro_batches_per_rank']} micro-batch(es)/rank | {r['steps']} steps "
        f"| load average at start / end: {r['loadavg_start']:.2f} / {r['loadavg_end']:.2f} "
        f"| source {r['moe_dist_source']}",
        "",
        "| tokens/s (all ranks) | tokens/s/rank | step ms (mean / median) | achieved GFLOP/s/rank "
        "| model-GEMM GFLOP/s/rank | % of GEMM rate | 1024³ GEMM GFLOP/s/rank | framework overhead |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_rank']:,.0f} | {step * 1e3:.1f} / "
        f"{r['step_median_s'] * 1e3:.1f} | {r['achieved_flops_per_s_per_rank'] / 1e9:.1f} | "
        f"{r['model_gemm_flops_per_s'] / 1e9:.1f} | {100 * r['model_gemm_fraction']:.0f}% | "
        f"{r['square_1024_gemm_flops_per_s'] / 1e9:.1f} | {100 * r['overhead_fraction']:.1f}% |",
        "",
        "| phase | ms/step (mean over ranks) | share of step |",
        "|---|---|---|",
    ]
    for name, seconds in r["phases_s"].items():
        tag = " (overhead)" if name in OVERHEAD_PHASES else ""
        lines.append(f"| {name}{tag} | {seconds * 1e3:.2f} | {100 * seconds / step:.1f}% |")
    lines.append(f"| unaccounted | {r['unaccounted_s'] * 1e3:.2f} | {100 * r['unaccounted_s'] / step:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON to this path")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.dim=256 parallel.ep=1")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    cfg = compose_config(args.overrides, world=env_world_size())
    result = run(cfg, warmup=args.warmup, steps=args.steps)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(render(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
