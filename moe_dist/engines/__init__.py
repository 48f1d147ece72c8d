"""Training engines behind one contract (``base.Engine``): ``native`` (AdamW + moe_dist's gradient sync) and
``deepspeed`` (ZeRO-1/2 over moe_dist's mesh). The factory and the engine-specific config checks live here;
each engine is imported only when chosen, and no engine imports another.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from moe_dist.config import EngineConfig, TrainerConfig
from moe_dist.engines.base import ADAM_SLOTS, Engine, zero_adam_state
from moe_dist.parallel.mesh import Mesh

__all__ = ["ADAM_SLOTS", "Engine", "build_engine", "validate_engine", "zero_adam_state"]


def validate_engine(engine: EngineConfig, trainer: TrainerConfig, *, world_size: int) -> None:
    """The chosen engine's own checks (beyond the schema's); ValueError naming the key and value."""
    if engine.name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                f"engine.name={engine.name!r}: needs the deepspeed package (pip install -e '.[deepspeed]')"
            )
        from moe_dist.engines.deepspeed import deepspeed_config

        deepspeed_config(engine, trainer, world_size=world_size)  # ValueError naming engine.deepspeed.<key>


def build_engine(model: nn.Module, *, engine: EngineConfig, trainer: TrainerConfig, mesh: Mesh) -> Engine:
    if engine.name == "deepspeed":
        from moe_dist.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, engine=engine, trainer=trainer, mesh=mesh)
    from moe_dist.engines.native import NativeEngine

    return NativeEngine(model, engine=engine, trainer=trainer, mesh=mesh)
