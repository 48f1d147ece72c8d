"""The engine contract: what turns a loss into an optimizer step, as the trainer and the checkpoints see it.

- ``backward(loss, last_micro_batch=...)``: the loss already carries the 1/accumulation factor;
- ``reduce_gradients() -> grad_norm``: gradients of the global-mean loss, and their exact global L2 norm,
  identical on all ranks;
- ``step(grad_norm, max_norm=...)``: clips with that norm and steps; ``zero_grad()``; ``set_lr(lr)``;
- ``checkpoint_state()`` → ``{"model.<param>": …, "optim.<param>.<slot>": …}`` for every trainable
  parameter: its fp32 master weights (whatever precision the model computes in) and its AdamW slots
  (``ADAM_SLOTS``), each in the *global* layout of ``moe_dist.parallel.layout`` — a plain tensor (whole,
  the same on every rank holding it), a ``DTensor`` (e.g. FSDP2's shards, experts over ``ep``), or
  ``Fragments`` (e.g. ZeRO's flat-partition ranges) — holding only what this rank owns, aliasing the live
  state. Nothing is gathered: the checkpoint writes each rank's pieces into one global layout that any
  engine at any (world, ep) reads back by resharding. ``after_checkpoint_load(state)`` is called with the
  same dict once a load has filled it in place (an engine refreshes what derives from it: low-precision
  model weights from the masters, step counters).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from moe_dist.optim import set_lr
from moe_dist.parallel.apply import clip_gradients_, split_parameters
from moe_dist.parallel.layout import GlobalTensor, expert_dtensor
from moe_dist.parallel.mesh import Mesh

ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq")


class Engine(Protocol):
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None: ...

    def reduce_gradients(self) -> torch.Tensor: ...

    def step(self, grad_norm: torch.Tensor, *, max_norm: float) -> None: ...

    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def checkpoint_state(self) -> dict[str, GlobalTensor]: ...

    def after_checkpoint_load(self, state: dict[str, GlobalTensor]) -> None: ...


class TorchAdamWEngine:
    """What the native and fsdp engines share: torch AdamW (``self.optimizer``) stepping the model's own
    tensors (``self.model``), clipped with the exact global norm the engine computed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, grad_norm: torch.Tensor, *, max_norm: float) -> None:
        clip_gradients_(self.model, max_norm=max_norm, total_norm=grad_norm)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)


def zero_adam_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's slots as torch creates them at the first step (so that a load has tensors to fill)."""
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def live_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, mesh: Mesh) -> dict[str, GlobalTensor]:
    """``checkpoint_state`` of an engine whose torch AdamW steps the model's own fp32 tensors: those tensors and
    their slots, aliasing the live state; experts as DTensors over ep (a DTensor, e.g. an FSDP2 shard, stays as
    it is). A fresh optimizer gets zero slots first, so that a load has tensors to fill in place."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    experts = {id(p) for p in split_parameters(model)[1]}
    state: dict[str, GlobalTensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A tensor the optimizer does not step (e.g. a gathered FSDP parameter) would get zero slots silently.
        assert id(p) in known, f"{name} is not a parameter of the optimizer"
        slots = optimizer.state[p]
        if not slots:
            slots.update(zero_adam_state(p))
        tensors = {f"model.{name}": p.detach()} | {f"optim.{name}.{key}": slots[key] for key in ADAM_SLOTS}
        for key, t in tensors.items():
            state[key] = expert_dtensor(t, mesh) if id(p) in experts else t
    return state
