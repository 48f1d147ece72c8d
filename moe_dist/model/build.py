"""The one place a model is built: from a config, a moe_dist checkpoint or a Hugging Face directory.

Every path is the same four moves: the single-device ``Transformer`` on the meta device (in the precision's
parameter dtype) → sharded over the mesh (``parallelize_moe``; activation checkpointing hooks; with
engine=fsdp, ``parallelize_fsdp``) → materialised on the device (only the shards) → initialised (seeded per
parameter and per global expert, then overwritten by what it starts from). The trainer, generation, export
and the scripts call it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from moe_dist.checkpoint import load_checkpoint, model_state, read_meta, resolve_checkpoint
from moe_dist.config import Config, ModelConfig, MoEConfig, TrainerConfig
from moe_dist.model.transformer import Transformer
from moe_dist.parallel.apply import apply_activation_checkpointing, parallelize_fsdp, parallelize_moe
from moe_dist.parallel.mesh import Mesh
from moe_dist.precision import param_dtype, resolve_precision


def build_model(cfg: Config, mesh: Mesh, device: torch.device) -> Transformer:
    """Single-device model on the meta device → sharded by the mesh → materialised → seeded init
    (→ the weights of ``model.init_from``, a local Hugging Face directory, when set)."""
    with torch.device("meta"):
        model = Transformer(cfg.model).to(param_dtype(cfg.trainer.precision))
    parallelize_moe(model, mesh)
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if cfg.trainer.compile:
        model.compile_blocks()  # compiled at the first forward; before FSDP wraps the blocks (torchtitan's order)
    if cfg.engine.name == "fsdp":
        bf16 = resolve_precision(cfg.trainer.precision, device) == "bf16"
        e = cfg.engine
        parallelize_fsdp(
            model, mesh, bf16=bf16, reshard_after_forward=e.reshard_after_forward, prefetch=e.prefetch
        )
    model.to_empty(device=device)
    model.init_weights(cfg.trainer.seed)
    if cfg.model.init_from:
        from moe_dist.hf import init_from_hf

        init_from_hf(model, cfg.model.init_from, mesh)
    return model


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with (keys this version does not know are ignored)."""
    saved = dict(meta["model"])
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    moe = MoEConfig(**{k: v for k, v in saved.pop("moe", {}).items() if k in moe_fields})
    return ModelConfig(**{k: v for k, v in saved.items() if k in model_fields}, moe=moe)


def load_model(path: str | os.PathLike, *, mesh: Mesh, device: torch.device) -> tuple[Transformer, dict]:
    """Collective. Builds the model as training does (sharded over ``mesh``), loads the checkpoint, eval mode.

    ``path`` is a checkpoint or a run directory (its newest checkpoint). Returns (model, meta). Any
    (world, ep) can load a checkpoint saved at any other.
    """
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    mcfg = dataclasses.replace(model_config_from_meta(meta), init_from=None)
    model = build_model(Config(model=mcfg, trainer=TrainerConfig(seed=meta.get("seed", 0))), mesh, device)
    load_checkpoint(path, state=model_state(model, mesh), model_cfg=dataclasses.asdict(mcfg))
    return model.eval(), meta
