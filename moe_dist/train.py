"""Hydra entry point: ``python -m moe_dist.train`` / ``torchrun --nproc_per_node N -m moe_dist.train``.

Overrides use the schema in moe_dist/config.py, e.g. ``parallel.ep=2 model.moe.num_experts=16``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moe_dist.config import Config, register_configs

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _run_stamp() -> str:
    """Run-directory name shared by all ranks when the launcher exports MOE_DIST_RUN_STAMP."""
    return os.environ.get("MOE_DIST_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("moe_dist.run_stamp", _run_stamp, replace=True)
register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from moe_dist.distributed import teardown_distributed
    from moe_dist.trainer import train

    cfg: Config = OmegaConf.to_object(dict_cfg)
    try:
        train(cfg, default_out_dir=HydraConfig.get().runtime.output_dir)
    except ValueError as err:  # a user error: one line naming the key and value, non-zero exit
        print(f"moe_dist: error: {err}", file=sys.stderr)
        teardown_distributed()
        sys.exit(2)
    teardown_distributed()


if __name__ == "__main__":
    main()
