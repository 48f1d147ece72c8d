"""The native engine: plain AdamW, dense gradients all-reduced over the world, experts over EDP."""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.config import TrainerConfig
from moe_dist.engines.base import live_state
from moe_dist.optim import build_optimizer, set_lr
from moe_dist.parallel.apply import clip_gradients_, global_grad_norm, sync_gradients
from moe_dist.parallel.layout import GlobalTensor
from moe_dist.parallel.mesh import Mesh


class NativeEngine:
    """Plain AdamW; dense gradients all-reduced over the world, experts over EDP (parallel/apply.py)."""

    def __init__(self, model: nn.Module, *, trainer: TrainerConfig, mesh: Mesh):
        self.model, self.mesh = model, mesh
        self.optimizer = build_optimizer(model, trainer)

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()

    def reduce_gradients(self) -> torch.Tensor:
        sync_gradients(self.model, self.mesh)
        return global_grad_norm(self.model, self.mesh)

    def step(self, grad_norm: torch.Tensor, *, max_norm: float) -> None:
        clip_gradients_(self.model, max_norm=max_norm, total_norm=grad_norm)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def checkpoint_state(self) -> dict[str, GlobalTensor]:
        """The live parameters (fp32: they are the masters) and AdamW slots, experts as DTensors over ep."""
        return live_state(self.model, self.optimizer, mesh=self.mesh)

    def after_checkpoint_load(self, state: dict[str, GlobalTensor]) -> None:
        """Nothing to do: ``checkpoint_state`` returned the live tensors, which the load filled in place."""
