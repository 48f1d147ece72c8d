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
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallelize_moe(model, mesh)
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
