"""The engine contract: what turns a loss into an optimizer step, as the trainer and the checkpoints see it.

- ``backward(loss, last_micro_batch=...)``: the loss already carries the 1/accumulation factor;
- ``reduce_gradients() -> grad_norm``: gradients of the global-mean loss, and their exact global L2 norm,
  identical on all ranks;
- ``step(grad_norm, max_norm=...)``: clips with that norm and steps; ``zero_grad()``; ``set_lr(lr)``;
- ``optimizer_slots()`` → ``{param name: {"step", "exp_avg", "exp_avg_sq"}}`` with full (unpartitioned)
  per-parameter tensors in moe_dist's layout (expert tensors are this rank's EP shard), or DTensors whose
  placements give the global layout (engine=fsdp: saved as they are, never gathered), and
  ``load_optimizer_slots(slots)`` to put such tensors back (called after the model weights are loaded).
  Checkpoints only see this, so they reshard across EP sizes *and* across engines.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq")


class Engine(Protocol):
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None: ...

    def reduce_gradients(self) -> torch.Tensor: ...

    def step(self, grad_norm: torch.Tensor, *, max_norm: float) -> None: ...

    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def optimizer_slots(self) -> dict[str, dict[str, torch.Tensor]]: ...

    def load_optimizer_slots(self, slots: dict[str, dict[str, torch.Tensor]]) -> None: ...


def live_adam_slots(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """A torch AdamW's live state tensors per parameter name, creating zero slots for a fresh optimizer (so
    that a checkpoint load has tensors to fill in place)."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    slots = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A tensor the optimizer does not step (e.g. a gathered FSDP parameter) would get zero slots silently.
        assert id(p) in known, f"{name} is not a parameter of the optimizer"
        state = optimizer.state[p]
        if not state:
            state.update(zero_adam_state(p))
        slots[name] = {key: state[key] for key in ADAM_SLOTS}
    return slots


def zero_adam_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's slots as torch creates them at the first step (so that a load has tensors to fill)."""
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
