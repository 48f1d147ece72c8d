"""One planned rank: the real training step of moe_dist on fake CUDA devices, with a fake process group.

The model is built by the trainer's own functions (model/build.py: the sharded meta model, then materialised
on ``cuda`` inside FakeTensorMode), the engine and the step state by ``trainer.assemble_run``, and one optimizer
step runs through ``trainer.train_step`` with its phase hook: the same code as a training job, on tensors
without data. What differs from a GPU job is said where it happens:
- the process group is torch's ``fake`` backend (collectives check nothing and move nothing);
- the routing comes from the plan (planning/routing.py), through the dispatcher's seam;
- scalar reads are answered by the recorder (1 / 1.0 / True: the grad norm is finite, no step is skipped);
- SDPA is routed to the fused kernel a GPU would pick (recorder.fused_sdpa);
- the optimizer state exists before the step (steady state, as from the second step on);
- backward runs on the calling thread (autograd's per-device threads lack the fake mode's thread-local state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_dist.config import Config, batch_layout
from moe_dist.data import TokenSplits, TokenStream
from moe_dist.hardware import GPU
from moe_dist.model.build import materialise_model, sharded_meta_model
from moe_dist.parallel.mesh import build_mesh
from moe_dist.planning.fake_cuda import fake_cuda_env
from moe_dist.planning.recorder import Collective, Kernel, MemoryStats, StepRecorder, Sync, fused_sdpa
from moe_dist.planning.routing import PlannedRouting, ReplayedRouting
from moe_dist.trainer import assemble_run, train_step, validate_run


@dataclass
class RankTrace:
    """What one rank did in one optimizer step."""

    rank: int
    ep_rank: int
    events: list[Kernel | Collective | Sync]
    memory: MemoryStats
    static: dict[
        str, int
    ]  # bytes by category once the gradients are reduced (params, grads, optimizer state)
    syncs: dict[str, int]
    local_params: int  # parameter elements held by this rank
    micro_batch_size: int
    accum_steps: int
    seconds: float  # wall time of the fake run


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int, *, single_rank_group: bool) -> Iterator[None]:
    """torch's in-process fake backend: any world size, collectives that return at once (at world 1 a group
    only where training starts one: engine=fsdp)."""
    if world_size == 1 and not single_rank_group:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def planning_config(cfg: Config) -> Config:
    """The run config as the planner runs it: nothing loaded from disk, nothing logged."""
    model = dataclasses.replace(cfg.model, init_from=None)
    trainer = dataclasses.replace(cfg.trainer, resume="none", progress_bar=False)
    return dataclasses.replace(cfg, model=model, trainer=trainer)


def plan_rank(
    cfg: Config, *, rank: int, gpu: GPU, skew: float, replay: list[list[int]] | None = None
) -> RankTrace:
    """Runs one optimizer step of ``cfg`` as rank ``rank`` of ``cfg.plan.world_size`` on fake GPUs (or fake
    CPUs: plan.device=cpu). ``replay``: routing counts recorded on this rank of a real run, in call order,
    instead of the planned routing."""
    cfg = planning_config(cfg)
    world_size = cfg.plan.world_size
    validate_run(cfg, world_size=world_size)
    started = time.perf_counter()
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    env = dict(device_count=cfg.plan.gpus_per_node, total_memory=int(gpu.memory_bytes), name=gpu.name)
    device_type = cfg.plan.device
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    single_rank_group = cfg.engine.name == "fsdp"
    with (
        fake_process_group(world_size, rank, single_rank_group=single_rank_group),
        fake_cuda_env(**env, fake_mode=fake_mode) as streams,
    ):
        mesh = build_mesh(ep=cfg.parallel.ep, num_experts=cfg.model.moe.num_experts, device_type=device_type)
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        model = sharded_meta_model(cfg, mesh, device)  # outside the fake mode (model/build.py says why)
        recorder = StepRecorder(device_type=device_type, rank=rank, streams=streams)
        micro_batch_size, _ = batch_layout(cfg.trainer, world_size=world_size)
        tokens = micro_batch_size * cfg.model.seq_len
        if replay is not None:
            ReplayedRouting(replay, labelled=recorder.labelled).install(model)
        else:
            PlannedRouting(tokens=tokens, skew=skew, labelled=recorder.labelled).install(model)
        # Any token stream of the right dtype: values never matter, shapes do.
        stream = TokenStream.from_array(
            np.zeros(cfg.model.seq_len + 2, dtype=np.int64), np.zeros(1, np.int64)
        )
        data = TokenSplits(train=stream, val=stream, description="planner (no data)")
        with fake_mode:
            materialise_model(model, cfg, mesh, device, init=False)  # values never matter
            run = assemble_run(
                cfg,
                mesh=mesh,
                device=device,
                data=data,
                model=model,
                timeout_s=600.0,
                checkpoints=False,  # never waited on
            )
            # The state AdamW holds from its first step on (the engine creates it for a checkpoint load).
            state = run.engine.checkpoint_state()
            recorder.track("parameters", model.parameters())
            recorder.track("buffers", model.buffers())
            recorder.track("optimizer_state", [t for key, t in state.items() if key.startswith("optim.")])
            del state
            static: dict[str, int] = {}

            @contextlib.contextmanager
            def phase(name: str) -> Iterator[None]:
                recorder.phase = name
                yield
                if name == "backward":
                    recorder.recategorize("gradients", [p.grad for p in model.parameters()])
                elif name == "reduce_gradients":
                    static.update({k: v for k, v in recorder.live.items() if v})

            with recorder, fused_sdpa(), torch.autograd.set_multithreading_enabled(False):
                train_step(run, 1, phase=phase)
            memory = recorder.memory()
            local_params = sum(
                getattr(p, "_local_tensor", p).numel() for p in model.parameters()
            )  # DTensor: shard
            return RankTrace(
                rank=rank,
                ep_rank=mesh.ep_rank,
                events=recorder.events,
                memory=memory,
                static=static,
                syncs=dict(recorder.syncs),
                local_params=local_params,
                micro_batch_size=micro_batch_size,
                accum_steps=run.accum_steps,
                seconds=time.perf_counter() - started,
            )
