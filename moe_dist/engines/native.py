"""The native engine: plain AdamW, dense gradients all-reduced over the world, experts over EDP (overlapped with
the last micro-batch's backward unless engine.overlap_grad_sync=false)."""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.config import EngineConfig, TrainerConfig
from moe_dist.engines.base import TorchAdamWEngine, live_state
from moe_dist.optim import build_optimizer
from moe_dist.parallel.apply import OverlappedGradSync, global_grad_norm, sync_gradients
from moe_dist.parallel.layout import GlobalTensor
from moe_dist.parallel.mesh import Mesh


class NativeEngine(TorchAdamWEngine):
    """Plain AdamW; dense gradients all-reduced over the world, experts over EDP (parallel/apply.py)."""

    def __init__(self, model: nn.Module, *, engine: EngineConfig, trainer: TrainerConfig, mesh: Mesh):
        self.model, self.mesh = model, mesh
        self.optimizer = build_optimizer(model, trainer)
        self.overlap = None
        if mesh.world_group is not None:
            # At most grad_bucket_mb of fp32 gradients, and small enough for 4 buckets: a small model too
            # gets its first buckets out while backward runs.
            total = sum(p.numel() for p in model.parameters() if p.requires_grad)
            bucket_numel = max(1, min(int(engine.grad_bucket_mb * 2**20) // 4, -(-total // 4)))
            self.overlap = OverlappedGradSync(model, mesh, bucket_numel=bucket_numel)
        self.overlap_grad_sync = engine.overlap_grad_sync  # may be switched between steps (bench_train does)
        self.armed = False

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        self.armed = self.overlap is not None and self.overlap_grad_sync and last_micro_batch
        if self.armed:
            self.overlap.arm()  # buckets go out while this backward still runs
        loss.backward()
        if self.armed:
            self.overlap.launch_remaining()  # all buckets in flight before any later collective

    def reduce_gradients(self) -> torch.Tensor:
        if self.armed:
            self.overlap.finish()
            self.armed = False
        else:
            sync_gradients(self.model, self.mesh)
        return global_grad_norm(self.model, self.mesh)

    def checkpoint_state(self) -> dict[str, GlobalTensor]:
        """The live parameters (fp32: they are the masters) and AdamW slots, experts as DTensors over ep."""
        return live_state(self.model, self.optimizer, mesh=self.mesh)

    def after_checkpoint_load(self, state: dict[str, GlobalTensor]) -> None:
        """Nothing to do: ``checkpoint_state`` returned the live tensors, which the load filled in place."""
