"""The planner against real runs on this machine: memory, all-to-all bytes and host syncs, per rank.

    python scripts/validate_plan.py [--cases 1x1,2x1,2x2,4x2,4x4] [--json PATH] [key=value ...]

A case ``WxE`` is world size W with parallel.ep=E. For each case, W gloo ranks train two steps of a small
CPU config (``key=value`` are Hydra overrides); step 2 is measured on every rank:
- peak memory: the bytes live at its start (parameters, buffers, AdamW state) plus the peak of what the step
  allocates net of frees, from the allocation events of torch.profiler (c10's CPU allocator, exact sizes);
- all-to-all bytes: bench_moe.py's meter (scripts/bench_common.py ``ExchangeMeter``: bytes each
  ``all_to_all_single`` sends to other ranks);
- host syncs a GPU would make: ``.item()`` / ``.tolist()`` / ops with data-dependent output sizes outside the
  data phase (AdamW's step counters excluded: they stay on the host on a GPU too), counted here by wrapping the
  Python calls, independently of the planner's recorder;
- the routing: every count the dispatchers read (their ``exchange_counts`` seam, wrapped).
Then ``moe_dist.plan`` plans the same job for a CPU (plan.device=cpu) with the recorded routing (every rank)
and with uniform routing, and for GPUs (plan.device=cuda). Checks: planned peak within 15% of the measured
one, planned all-to-all bytes with the recorded routing equal to the meter's, planned syncs equal to the
counted ones. Exit status 1 when a check fails.
"""

from __future__ import annotations

if __name__ == "__main__":  # the fake-CUDA shim, before torch (spawned ranks import this file as __mp_main__)
    from moe_dist.planning.fake_cuda import load_shim

    load_shim()

import argparse
import contextlib
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import ExchangeMeter, Runtime, peak_step_bytes
from torch.utils._python_dispatch import TorchDispatchMode

from moe_dist.moe.layer import MoELayer

CONFIG = [  # small enough for 2 CPU cores at world 4; accumulation over 2 micro-batches
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.seq_len=64",
    "model.ffn_hidden=128",
    "model.moe.num_experts=8",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=128",
    "trainer.micro_batch_size=4",
    "trainer.eval_every=0",
    "trainer.progress_bar=false",
    "parallel.backend=gloo",
    "logging.wandb.mode=disabled",
]
MEMORY_TOLERANCE = 0.15
aten = torch.ops.aten
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.bincount.default,
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from moe_dist.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


class HostReads(TorchDispatchMode):
    """Counts the reads of device values a GPU would sync on, in a real CPU step (see the module doc)."""

    def __init__(self, host_scalars: set[int]):
        super().__init__()
        self.host_scalars, self.phase, self.count = host_scalars, "data", 0
        self._saved = None

    def _counts(self, t: torch.Tensor) -> bool:
        return self.phase != "data" and t.untyped_storage().data_ptr() not in self.host_scalars

    def __enter__(self):
        self._saved = torch.Tensor.tolist
        reads = self

        def tolist(t):
            if reads._counts(t):
                reads.count += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return reads._saved(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (func is aten._local_scalar_dense.default or func in DATA_DEPENDENT) and self._counts(args[0]):
            self.count += 1
        return func(*args, **(kwargs or {}))


def measured_rank(rank: int, world: int, overrides: list[str]) -> dict:
    """One rank of the real run: two steps, the second one measured."""
    from moe_dist.trainer import build_run, train_step

    run = build_run(compose(overrides))
    answers: list[list[list[list[int]]]] = []
    for layer in run.model.modules():
        if isinstance(layer, MoELayer):
            real = layer.dispatcher.exchange_counts

            def recorded(kept_CE, real=real):
                answer = real(kept_CE)
                answers.append(answer)
                return answer

            layer.dispatcher.exchange_counts = recorded
    train_step(run, 1)
    answers.clear()
    state = [t for s in run.engine.optimizer.state.values() for t in s.values()]
    live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*run.model.parameters(), *run.model.buffers(), *state]}  # fmt: skip
    reads = HostReads({t.untyped_storage().data_ptr() for t in state if t.numel() == 1})

    @contextlib.contextmanager
    def phase(name):
        reads.phase = name
        yield

    rt = Runtime(device=run.device, rank=rank, world=world, mesh=run.mesh)
    with ExchangeMeter(rt) as meter, reads:
        step_peak, _ = peak_step_bytes(rt, lambda: train_step(run, 2, phase=phase))
    return {
        "peak_bytes": sum(live.values()) + step_peak,
        "a2a_bytes": meter.payload_bytes,
        "a2a_meta_bytes": meter.meta_bytes,
        "host_syncs": reads.count,
        "routing": answers,
    }


def _worker(rank: int, world: int, pg_dir: str, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{pg_dir}/pg", rank=rank, world_size=world)
    result = measured_rank(rank, world, overrides)
    with open(os.path.join(pg_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


def real_run(world: int, overrides: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as pg_dir:
        mp.spawn(_worker, args=(world, pg_dir, overrides), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(pg_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def planned(overrides: list[str], *, world: int, device: str, replay=None):
    from moe_dist.planning.planner import make_plan, traffic  # noqa: F401

    cfg = compose([*overrides, f"plan.world_size={world}", f"plan.device={device}", "plan.depth=full"])
    return make_plan(cfg, replay=replay)


def a2a_sent(role) -> int:
    return sum(row["bytes"] for row in role.traffic if row["kind"] == "all_to_all")


def validate_case(world: int, ep: int, extra: list[str]) -> dict:
    overrides = [*CONFIG, f"parallel.ep={ep}", f"trainer.global_batch_size={8 * world}", *extra]
    started = time.perf_counter()
    real = real_run(world, overrides)
    real_s = time.perf_counter() - started
    replayed = planned(
        overrides, world=world, device="cpu", replay={r: m["routing"] for r, m in enumerate(real)}
    )
    uniform = planned(overrides, world=world, device="cpu")
    gpu = planned(overrides, world=world, device="cuda")
    ranks = []
    for rank, (measured, role) in enumerate(zip(real, replayed.roles)):
        ranks.append(
            {
                "rank": rank,
                "measured_peak_bytes": measured["peak_bytes"],
                "planned_peak_bytes": role.peak_bytes,
                "uniform_planned_peak_bytes": uniform.roles[0].peak_bytes,
                "peak_error": role.peak_bytes / measured["peak_bytes"] - 1,
                "measured_a2a_bytes": measured["a2a_bytes"],
                "planned_a2a_bytes": a2a_sent(role),
                "uniform_planned_a2a_bytes": a2a_sent(uniform.roles[0]),
                "measured_host_syncs": measured["host_syncs"],
                "planned_host_syncs": sum(role.syncs.values()),
                "gpu_planned_host_syncs": sum(gpu.roles[0].syncs.values()),
                "gpu_planned_peak_bytes": gpu.roles[0].peak_bytes,
            }
        )
    ok = all(
        abs(r["peak_error"]) <= MEMORY_TOLERANCE
        and r["planned_a2a_bytes"] == r["measured_a2a_bytes"]
        and r["planned_host_syncs"] == r["measured_host_syncs"]
        for r in ranks
    )
    return {"world": world, "ep": ep, "ok": ok, "real_run_s": real_s, "ranks": ranks}


def render(cases: list[dict]) -> str:
    lines = [
        "world ep rank | peak MiB measured  planned (err)   uniform | a2a bytes measured   planned   uniform"
        " | syncs measured planned | GPU plan: syncs, peak MiB"
    ]
    for case in cases:
        for r in case["ranks"]:
            lines.append(
                f"{case['world']:>5} {case['ep']:>2} {r['rank']:>4} | {r['measured_peak_bytes'] / 2**20:>17.2f} "
                f"{r['planned_peak_bytes'] / 2**20:>8.2f} ({r['peak_error']:+.1%}) "
                f"{r['uniform_planned_peak_bytes'] / 2**20:>8.2f} | {r['measured_a2a_bytes']:>18,} "
                f"{r['planned_a2a_bytes']:>9,} {r['uniform_planned_a2a_bytes']:>9,} | "
                f"{r['measured_host_syncs']:>14} {r['planned_host_syncs']:>7} | "
                f"{r['gpu_planned_host_syncs']:>5}, {r['gpu_planned_peak_bytes'] / 2**20:.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="1x1,2x1,2x2,4x2,4x4", help="comma-separated WORLDxEP")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the validated config")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    cases = []
    for spec in args.cases.split(","):
        world, ep = (int(x) for x in spec.lower().split("x"))
        cases.append(validate_case(world, ep, args.overrides))
        print(f"[{time.perf_counter() - started:5.0f}s] world {world} ep {ep}: {'ok' if cases[-1]['ok'] else 'FAILED'}",
              flush=True)  # fmt: skip
    print(render(cases))
    print(f"validate_plan: {time.perf_counter() - started:.0f} s, load average {load:.1f} at the start")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": CONFIG + args.overrides, "cases": cases}, indent=1))
    sys.exit(0 if all(c["ok"] for c in cases) else 1)


if __name__ == "__main__":
    main()
