"""Memory per rank of one training step: native / DeepSpeed ZeRO-2 / fsdp, at world 1, 2 and 4, with each
activation checkpointing mode. Prints a Markdown table and writes JSON.

    python scripts/bench_memory.py [--worlds 1 2 4] [--engines native deepspeed fsdp]
                                   [--modes none full moe every_n:2] [--json PATH] [key=value ...]

Every (world, engine, mode) runs in fresh processes (W gloo ranks spawned here, or NCCL on GPUs), builds the
run as the trainer does (``build_run``: the default model, configs/model/small_moe.yaml, the global batch
split over the ranks in one micro-step, EP = min(2, W)), takes 2 warm-up steps (AdamW state exists), then
measures on every rank:

- parameters, gradients and optimizer state held by this rank (local shards of DTensors; DeepSpeed's fp32
  master partitions count as optimizer state), read from the tensors at the optimizer step;
- the allocator peak of one ``train_step`` above what was live at its start (moe_dist.memory.AllocatorPeak:
  CUDA ``max_memory_allocated``; on CPU the allocation and free events of c10's allocator replayed from
  torch's profiler): activations, gradients and communication buffers;
- peak = parameters + optimizer state + that step peak (the tensors of the run, without the data set);
- the process's peak RSS during another step (CPU: VmHWM, with the ~0.3 GiB of torch libraries and the
  data set; reset before the step).

The table shows the largest value over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import quiet_stderr, source_version
from torch.distributed.tensor import DTensor

from moe_dist.memory import AllocatorPeak, peak_memory_bytes, reset_peak_memory
from moe_dist.trainer import build_run, train_step

WARMUP_STEPS = 2
# DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32), more than this model: sized to it here.
DEEPSPEED_BUCKET = 1 << 20
ENGINE_OVERRIDES = {
    "native": ["engine=native"],
    "deepspeed": [
        "engine=deepspeed",
        "engine.zero_stage=2",
        f"+engine.deepspeed.zero_optimization.reduce_bucket_size={DEEPSPEED_BUCKET}",
        f"+engine.deepspeed.zero_optimization.allgather_bucket_size={DEEPSPEED_BUCKET}",
    ],
    "fsdp": ["engine=fsdp"],
}
MIB = 2**20


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from moe_dist.train import CONFIG_DIR  # registers the schemas and resolvers

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


def nbytes(tensors) -> int:
    """Bytes of the tensors (a DTensor: its local shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def held_bytes(run) -> dict[str, int]:
    """Parameters, gradients and optimizer state this rank holds (call at the optimizer step)."""
    optimizer = getattr(run.engine, "adam", None) or run.engine.optimizer
    params = list(run.model.parameters())
    model_ids = {id(p) for p in params}
    # DeepSpeed steps fp32 partitions (copies of the parameters): their values are optimizer state.
    masters = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in model_ids]
    grads = [p.grad for p in params + masters if p.grad is not None]
    zero = getattr(getattr(run.engine, "ds", None), "optimizer", None)
    # ZeRO-2 keeps this rank's reduced gradient partitions in its own lists until its step.
    grads += [g for gs in getattr(zero, "averaged_gradients", {}).values() for g in gs if torch.is_tensor(g)]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"params": nbytes(params), "grads": nbytes(grads), "optimizer": nbytes(state) + nbytes(masters)}


def measure(overrides: list[str]) -> dict[str, Any]:
    cfg = compose(overrides)
    run = build_run(cfg)
    for step in range(1, WARMUP_STEPS + 1):
        train_step(run, step)
        run.stats.reset()
    held = {}
    step_fn = run.engine.step

    def step_and_record(grad_norm, *, max_norm):
        held.update(held_bytes(run))
        step_fn(grad_norm, max_norm=max_norm)

    run.engine.step = step_and_record
    reset_peak_memory(run.device)
    train_step(run, WARMUP_STEPS + 1)
    rss = peak_memory_bytes(run.device)
    run.stats.reset()
    with quiet_stderr(), AllocatorPeak(run.device) as peak:
        train_step(run, WARMUP_STEPS + 2)
    loss = run.stats.record()["loss"]  # global: train_step all-reduced the step's statistics
    return {
        **held,
        "step_peak": peak.bytes,
        "peak": held["params"] + held["optimizer"] + peak.bytes,
        "peak_rss": rss,
        "loss": loss,
        "world": run.mesh.world_size,
        "ep": run.mesh.ep,
    }


def worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = measure(overrides)
    if dist.is_initialized():
        values = torch.tensor(
            [result[k] for k in ("params", "grads", "optimizer", "step_peak", "peak", "peak_rss")],
            dtype=torch.float64,
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        for k, v in zip(("params", "grads", "optimizer", "step_peak", "peak", "peak_rss"), values.tolist()):
            result[k] = v
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result.json"
        mp.spawn(worker, args=(world, free_port(), overrides, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| world | ep | engine | activation ckpt | params MiB | grads MiB | optimizer MiB | step peak MiB | "
        "peak MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['ep']} | {r['engine']} | {r['mode']} | {r['params'] / MIB:.1f} | "
            f"{r['grads'] / MIB:.1f} | {r['optimizer'] / MIB:.1f} | {r['step_peak'] / MIB:.1f} | "
            f"{r['peak'] / MIB:.1f} | {r['peak_rss'] / MIB:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--engines", nargs="+", default=list(ENGINE_OVERRIDES), choices=list(ENGINE_OVERRIDES)
    )
    parser.add_argument("--modes", nargs="+", default=["none", "full", "moe", "every_n:2"])
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON to this path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.dim=256")
    args = parser.parse_args()
    loadavg_start = os.getloadavg()[0]
    rows = []
    for world in args.worlds:
        for engine in args.engines:
            for mode in args.modes:
                overrides = [
                    "trainer.progress_bar=false",
                    "parallel.backend=auto",
                    f"parallel.ep={min(2, world)}",
                    "trainer.accum_steps=1",
                    f"trainer.activation_checkpointing={mode}",
                    *ENGINE_OVERRIDES[engine],
                    *args.overrides,
                ]
                row = {"engine": engine, "mode": mode, **run_config(world, overrides)}
                rows.append(row)
                print(
                    f"world {world} {engine} {mode}: peak {row['peak'] / MIB:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    print(render(rows))
    record = {
        "rows": rows,
        "torch": torch.__version__,
        "moe_dist_source": source_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg()[0],
        "overrides": args.overrides,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
