"""Hydra entry point: ``python -m moe_dist.train`` / ``torchrun --nproc_per_node N -m moe_dist.train``.

Overrides use the schema in moe_dist/config.py, e.g. ``parallel.ep=2 model.moe.num_experts=16``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_dist.config import Config, register_configs

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _run_stamp() -> str:
    """Run-directory name shared by all ranks when the launcher exports MOE_DIST_RUN_STAMP."""
    return os.environ.get("MOE_DIST_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S")


# Cached: Hydra re-resolves run/sweep dirs several times and every resolution must give the same name.
OmegaConf.register_new_resolver("moe_dist.run_stamp", _run_stamp, replace=True, use_cache=True)
register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from moe_dist.distributed import teardown_distributed
    from moe_dist.guards import Watchdog
    from moe_dist.trainer import train

    cfg: Config = OmegaConf.to_object(dict_cfg)
    try:
        train(cfg, default_out_dir=HydraConfig.get().runtime.output_dir)
    except ValueError as err:  # a user error: one line naming the key and value
        print(f"moe_dist: error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweep records the failed job and goes on with the others
        sys.exit(2)
    except Exception as err:  # a failed run: the traceback, then one line naming rank, step and phase
        traceback.print_exc()
        where = Watchdog.latest.describe() if Watchdog.latest else "start-up"
        first_line = (str(err).splitlines() or [""])[0]
        print(f"moe_dist: error: {where}: {type(err).__name__}: {first_line}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)
    teardown_distributed()


if __name__ == "__main__":
    main()
