"""Training engines: what turns a loss into an optimizer step.

Both engines share one contract with the trainer and the checkpoints:
- ``backward(loss, last_micro_batch=...)`` (the loss already carries the 1/accumulation factor);
  ``reduce_gradients() -> grad_norm`` (gradients of the global-mean loss, and their exact
  global L2 norm, identical on all ranks); ``step(grad_norm, max_norm)`` clips with that norm and steps;
  ``zero_grad()``; ``set_lr(lr)``;
- ``optimizer_slots()`` → ``{param name: {"step", "exp_avg", "exp_avg_sq"}}`` with full (unpartitioned)
  per-parameter tensors in moe_dist's layout (expert tensors are this rank's EP shard), and
  ``load_optimizer_slots(slots)`` to put such tensors back (called after the model weights are loaded).
  Checkpoints only see this, so they reshard across EP sizes *and* across engines.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.config import EngineConfig, TrainerConfig
from moe_dist.optim import build_optimizer, set_lr
from moe_dist.parallel.apply import clip_gradients_, global_grad_norm, sync_gradients
from moe_dist.parallel.mesh import Mesh

ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq")


def zero_adam_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's slots as torch creates them at the first step (so that a load has tensors to fill)."""
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


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

    def optimizer_slots(self) -> dict[str, dict[str, torch.Tensor]]:
        """The live state tensors (creating zero slots for a fresh optimizer, so a load has tensors to fill)."""
        slots = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            state = self.optimizer.state[p]
            if not state:
                state.update(zero_adam_state(p))
            slots[name] = {key: state[key] for key in ADAM_SLOTS}
        return slots

    def load_optimizer_slots(self, slots: dict[str, dict[str, torch.Tensor]]) -> None:
        """Nothing to do: ``optimizer_slots`` returned the live tensors, which the load filled in place."""


def build_engine(model: nn.Module, *, engine: EngineConfig, trainer: TrainerConfig, mesh: Mesh):
    if engine.name == "deepspeed":
        from moe_dist.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, engine=engine, trainer=trainer, mesh=mesh)
    return NativeEngine(model, trainer=trainer, mesh=mesh)
