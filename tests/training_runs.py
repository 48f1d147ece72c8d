"""Composes run configs with Hydra exactly as the CLI does, and runs the trainer in-process."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_dist.train import CONFIG_DIR  # registers the schemas and resolvers
from moe_dist.trainer import train

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=32",
    "model.ffn_hidden=64",
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=32",
    "model.moe.aux_loss_coef=0.01",
    "model.moe.z_loss_coef=0.001",
    "trainer.global_batch_size=8",
    "trainer.lr=3e-3",
    "trainer.warmup_steps=2",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress_bar=false",
    "parallel.backend=gloo",
]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def run(overrides: list[str]) -> str:
    cfg = compose_config(TINY + overrides)
    return str(train(cfg, default_out_dir=cfg.trainer.out_dir))
