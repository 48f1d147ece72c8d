"""FSDP2 × expert parallelism behind moe_dist's engine contract (see moe_dist/engines/base.py).

The model arrives sharded (``model/build.py`` calls ``parallel.apply.parallelize_fsdp`` for engine=fsdp):
dense parameters are DTensors sharded over all W ranks, expert parameters DTensors of the global [E, ...]
tensors on the (edp, ep) mesh. FSDP2 all-gathers each unit before its forward and backward and reduce-scatters
its gradients after backward (every micro-step: gradients stay sharded between micro-steps), averaging over
the unit's mesh: dense over the world, experts over EDP. This engine then

- divides the expert gradients by ep: the backward all-to-all already summed the EP group, so the EDP mean
  is ep times the gradient of the global-mean loss (the native engine's sum / W, see parallel/apply.py);
- computes the exact global norm from the local shards (each element lives on one rank: one world sum) and
  clips with it, the same factor on every rank;
- steps torch AdamW on the local shards: parameters, gradients and Adam state stay DTensors, never gathered.

Checkpoints see ``checkpoint_state()``: the sharded parameters (fp32 masters, also under bf16: FSDP2 casts
only the gathered copies) and their Adam state, DTensors whose placements give the global layout. Each rank
writes its own shards, nothing is gathered, and any engine, world and EP degree can resume them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from moe_dist.config import TrainerConfig
from moe_dist.engines.base import TorchAdamWEngine, live_state
from moe_dist.optim import build_optimizer
from moe_dist.parallel.apply import scale_expert_grads_, sharded_grad_norm
from moe_dist.parallel.layout import GlobalTensor
from moe_dist.parallel.mesh import Mesh


class FSDPEngine(TorchAdamWEngine):
    """AdamW on FSDP2-sharded parameters; gradients reduce-scattered by FSDP in backward."""

    def __init__(self, model: nn.Module, *, trainer: TrainerConfig, mesh: Mesh):
        self.model, self.mesh = model, mesh
        self.optimizer = build_optimizer(model, trainer)

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()  # FSDP2 reduce-scatters each unit's gradients as its backward finishes

    def reduce_gradients(self) -> torch.Tensor:
        scale_expert_grads_(self.model, 1.0 / self.mesh.ep)  # EDP mean → sum over all W ranks / W
        return sharded_grad_norm(self.model, self.mesh)

    def checkpoint_state(self) -> dict[str, GlobalTensor]:
        """The live sharded parameters and their AdamW slots, DTensors placed like the parameters.

        Every unit is resharded first: a forward without backward (evaluation) leaves the units that do not
        reshard after forward (the head; all with engine.reshard_after_forward=false) gathered, and their
        module attributes are then the gathered tensors, not the optimizer's sharded parameters.
        """
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return live_state(self.model, self.optimizer, mesh=self.mesh)

    def after_checkpoint_load(self, state: dict[str, GlobalTensor]) -> None:
        """Nothing to do: ``checkpoint_state`` returned the live shards, which the load filled in place (the
        next forward gathers them anew)."""
