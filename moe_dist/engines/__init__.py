"""Training engines behind one contract (``base.Engine``): ``native`` (AdamW + moe_dist's gradient sync),
``deepspeed`` (ZeRO-1/2 over moe_dist's mesh) and ``fsdp`` (FSDP2: parameters, gradients and Adam state
sharded, experts over the (edp, ep) mesh). The factory and the engine-specific config checks live here;
each engine is imported only when chosen, and no engine imports another.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from moe_dist.config import EngineConfig, ModelConfig, TrainerConfig
from moe_dist.engines.base import ADAM_SLOTS, Engine, zero_adam_state
from moe_dist.parallel.mesh import Mesh

__all__ = ["ADAM_SLOTS", "Engine", "build_engine", "validate_engine", "zero_adam_state"]


def validate_engine(
    engine: EngineConfig,
    trainer: TrainerConfig,
    *,
    world_size: int,
    model: ModelConfig | None = None,
    ep: int = 1,
) -> None:
    """The chosen engine's own checks (beyond the schema's); ValueError naming the key and value."""
    if engine.name == "fsdp" and model is not None:
        validate_fsdp_model(model, world_size=world_size, ep=ep)
    if engine.name == "deepspeed":
        if trainer.precision == "fp64":
            raise ValueError(
                "trainer.precision='fp64': DeepSpeed reduces fp16, bf16 and fp32 gradients only; the fp64 "
                "verification mode runs with engine=native or engine=fsdp"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                f"engine.name={engine.name!r}: needs the deepspeed package (pip install -e '.[deepspeed]')"
            )
        from moe_dist.engines.deepspeed import deepspeed_config

        deepspeed_config(engine, trainer, world_size=world_size)  # ValueError naming engine.deepspeed.<key>


def validate_fsdp_model(model: ModelConfig, *, world_size: int, ep: int) -> None:
    """What FSDP2 x EP cannot shard: expert weights split along the model dim must split evenly."""
    edp, num_local = world_size // ep, model.moe.num_experts // ep
    if model.moe.num_experts == 0 or num_local % edp == 0:
        return  # experts split along the expert dim
    # FSDP2 shards w_gate_up [L, D, 2F] and w_down [L, F, D] along dim 1 (D, F) and needs it even there.
    for key, value in (("model.dim", model.dim), ("model.moe.expert_hidden", model.moe.expert_hidden)):
        if value % edp:
            raise ValueError(
                f"{key}={value}: must be divisible by edp = world / parallel.ep = {edp} with engine.name='fsdp' "
                f"when edp does not divide the {num_local} local experts (FSDP then splits the expert weights "
                "along this dim)"
            )


def build_engine(model: nn.Module, *, engine: EngineConfig, trainer: TrainerConfig, mesh: Mesh) -> Engine:
    if engine.name == "deepspeed":
        from moe_dist.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, engine=engine, trainer=trainer, mesh=mesh)
    if engine.name == "fsdp":
        from moe_dist.engines.fsdp import FSDPEngine

        return FSDPEngine(model, trainer=trainer, mesh=mesh)
    from moe_dist.engines.native import NativeEngine

    return NativeEngine(model, engine=engine, trainer=trainer, mesh=mesh)
