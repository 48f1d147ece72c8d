"""Checkpoint benchmark: how long training stalls per save (synchronous vs asynchronous) and how much memory a
save takes beyond the live training state, for each engine, on one model.

    torchrun --nproc_per_node 2 scripts/bench_checkpoint.py [--json PATH] [--saves N] [key=value ...]

The default model has 155.6M parameters (4 layers, D 512, 16 experts of width 1536: 151M in experts). Cases:
the native engine at ep 2, DeepSpeed ZeRO-2 at ep 1 (every optimizer state partitioned over the 2 ranks) and
fsdp at ep 1 (parameters and optimizer state sharded over the 2 ranks, experts over EDP).
Each save goes through moe_dist.checkpoint.Checkpointer, as in training; its stall is the time the training
loop is blocked (sync: the whole save with per-rank hashing, digest gather and rename; async: the copy to
host memory). While an async save writes in the background the benchmark keeps training and times those
steps against undisturbed ones (2 CPU cores here: the background write competes for them).

Memory is the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before
the save, per rank (the larger of the two ranks is reported). The script re-executes itself with
MALLOC_MMAP_THRESHOLD_=131072 so that large blocks are unmapped when freed and the peak measures what a
phase allocates. For ZeRO the row "gather" measures what the former engine contract did before every save
and load: all-reducing full fp32 exp_avg and exp_avg_sq of every parameter on every rank.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_common import source_version
from bench_train import compose_config

from moe_dist.checkpoint import Checkpointer
from moe_dist.distributed import broadcast_json
from moe_dist.model.transformer import count_parameters
from moe_dist.trainer import Run, _checkpoint_meta, build_run, train_step, training_state

MODEL = [
    "model.dim=512",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.ffn_hidden=2048",
    "model.moe.num_experts=16",
    "model.moe.expert_hidden=1536",
    "model.seq_len=64",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=1",
    "data.val_fraction=0.05",
]
CASES = {
    "native ep2": ["parallel.ep=2"],
    "deepspeed zero2 ep1": ["parallel.ep=1", "engine=deepspeed", "engine.zero_stage=2"],
    "fsdp ep1": ["parallel.ep=1", "engine=fsdp"],
}
MIB = 2**20


def resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakAbove:
    """Peak resident memory from ``start()`` on, above the resident memory at ``start()``."""

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.base = resident("VmRSS")

    def read(self) -> int:
        return resident("VmHWM") - self.base


def rank_max(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def timed_step(run: Run, step: int) -> float:
    start = time.perf_counter()
    train_step(run, step)
    return time.perf_counter() - start


def gather_full_slots(run: Run) -> None:
    """The former ``optimizer_slots`` of the DeepSpeed engine: full fp32 slots of every parameter, all held."""
    from deepspeed.utils import safe_get_full_optimizer_state

    held = [
        safe_get_full_optimizer_state(p, key)
        for _, p in run.engine.params
        for key in ("exp_avg", "exp_avg_sq")
    ]
    assert all(t is not None for t in held)


def bench_case(name: str, overrides: list[str], *, saves: int, out: Path) -> dict:
    cfg = compose_config([*MODEL, *overrides], world=dist.get_world_size())
    run = build_run(cfg)
    step = 0
    for _ in range(2):  # warm-up: every buffer of a step exists
        step += 1
        train_step(run, step)
    steps_s = []
    for _ in range(3):
        step += 1
        steps_s.append(timed_step(run, step))
    local: dict[str, float] = {"step_s": statistics.median(steps_s)}
    peak = PeakAbove()
    peak.start()
    timed_step(run, step + 1)
    step += 1
    local["step_peak_mib"] = peak.read() / MIB
    if name.startswith("deepspeed"):
        peak.start()
        gather_full_slots(run)
        local["gather_peak_mib"] = peak.read() / MIB
    for is_async in (False, True):
        mode = "async" if is_async else "sync"
        directory = out / f"{name.replace(' ', '_')}_{mode}"
        checkpointer = Checkpointer(directory, keep=1, is_async=is_async, group=run.checkpoint_group)
        stalls, save_peaks, writes, busy_steps, background_peaks = [], [], [], [], []
        for _ in range(saves):
            peak.start()
            report = checkpointer.save(step, training_state(run), meta=_checkpoint_meta(run))
            save_peaks.append(peak.read())
            stalls.append(report.stall_s)
            if is_async:  # keep training while the save is written; every rank runs the same number of steps
                while True:
                    step += 1
                    busy_steps.append(timed_step(run, step))
                    done = torch.tensor([float(not checkpointer.busy())])
                    dist.all_reduce(done, op=dist.ReduceOp.MIN)
                    if done.item():
                        break
                background_peaks.append(peak.read())
                checkpointer.wait()
                writes.append(checkpointer.completed.pop()["write_s"])
            step += 1
            train_step(run, step)
        checkpointer.close()
        local[f"{mode}_stall_s"] = statistics.median(stalls)
        local[f"{mode}_save_peak_mib"] = max(save_peaks) / MIB
        if is_async:
            local["async_write_s"] = statistics.median(writes)
            local["async_background_peak_mib"] = max(background_peaks) / MIB
            local["steps_during_write"] = len(busy_steps) / saves
            local["step_during_write_s"] = statistics.median(busy_steps)
        local["checkpoint_mib"] = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / MIB
    params = count_parameters(run.model)
    result = rank_max(local) | {"parameters": params["total"]}
    del run
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every case")
    args = parser.parse_args()
    loadavg_start = os.getloadavg()[0]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = Path(broadcast_json(tempfile.mkdtemp(prefix="bench_checkpoint_") if rank == 0 else ""))
    results = {}
    for name, overrides in CASES.items():
        results[name] = bench_case(name, [*overrides, *args.overrides], saves=args.saves, out=out)
        dist.barrier()
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        record = {
            "machine": {
                "cpu_cores": os.cpu_count(),
                "torch": torch.__version__,
                "world": dist.get_world_size(),
                "threads_per_rank": torch.get_num_threads(),
                "loadavg_start": loadavg_start,
                "loadavg_end": os.getloadavg()[0],
                "moe_dist_source": source_version(),
            },
            "model_overrides": MODEL + args.overrides,
            "saves_per_mode": args.saves,
            "results": results,
        }
        print_table(record)
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    dist.destroy_process_group()


def print_table(record: dict) -> None:
    m = record["machine"]
    print(
        f"bench_checkpoint | world {m['world']} | {m['cpu_cores']} CPU cores, {m['threads_per_rank']} thread/rank | "
        f"torch {m['torch']} | load {m['loadavg_start']:.1f}->{m['loadavg_end']:.1f} | {m['moe_dist_source']}"
    )
    header = (
        "| case | params | ckpt MiB | step s | sync stall s | async stall s | async write s | step during write s "
        "| save peak MiB: sync / async stall / async incl. write | step peak MiB | gather peak MiB |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, r in record["results"].items():
        gather = f"{r['gather_peak_mib']:.0f}" if "gather_peak_mib" in r else "-"
        print(
            f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['checkpoint_mib']:.0f} | {r['step_s']:.2f} | "
            f"{r['sync_stall_s']:.2f} | {r['async_stall_s']:.2f} | {r['async_write_s']:.2f} | "
            f"{r['step_during_write_s']:.2f} | {r['sync_save_peak_mib']:.0f} / {r['async_save_peak_mib']:.0f} / "
            f"{r['async_background_peak_mib']:.0f} | {r['step_peak_mib']:.0f} | {gather} |"
        )


if __name__ == "__main__":
    main()
