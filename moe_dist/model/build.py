"""The one place a model is built: from a config, a moe_dist checkpoint or a Hugging Face directory.

Every path is the same four moves: the single-device ``Transformer`` on the meta device → sharded over the
mesh (``parallelize_moe``) → materialised on the device → initialised (seeded per parameter and per global
expert, then overwritten by what it starts from). The trainer, generation, export and the scripts call it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from moe_dist.checkpoint import load_checkpoint, model_state, read_meta, resolve_checkpoint
from moe_dist.config import Config, ModelConfig, MoEConfig, TrainerConfig
from moe_dist.model.transformer import Transformer
from moe_dist.parallel.apply import parallelize_moe
from moe_dist.parallel.mesh import Mesh


def build_model(cfg: Config, mesh: Mesh, device: torch.device) -> Transformer:
    """Single-device model on the meta device → sharded by the mesh → materialised → seeded init
    (→ the weights of ``model.init_from``, a local Hugging Face directory, when set)."""
    return materialise_model(sharded_meta_model(cfg, mesh), cfg, mesh, device)


def sharded_meta_model(cfg: Config, mesh: Mesh) -> Transformer:
    """The first half of ``build_model``: the model on the meta device, sharded over the mesh.

    The planner (moe_dist.plan) calls the two halves apart: this one outside its FakeTensorMode (a module
    built on meta inside it cannot be moved to a device: its parameters would have to be swapped).
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallelize_moe(model, mesh)
    return model


def materialise_model(
    model: Transformer, cfg: Config, mesh: Mesh, device: torch.device, *, init: bool = True
) -> Transformer:
    """The second half of ``build_model``: on the device, seeded init, then ``model.init_from`` if set.
    ``init=False`` leaves the values undefined (the planner's fake tensors have none)."""
    model.to_empty(device=device)
    if not init:
        return model
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
