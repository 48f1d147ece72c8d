"""Plan a cluster job on one CPU: ``python -m moe_dist.plan <overrides> plan.world_size=64 plan.gpu=h100``.

Runs moe_dist's real training step for the planned ranks on fake CUDA devices (FakeTensorMode and torch's fake
process group) and prints memory, traffic, FLOPs and a roofline step time; ``plan.search=true`` ranks the
feasible layouts. Takes the training overrides (``model=... parallel.ep=... trainer.micro_batch_size=...``)
and the ``plan.*`` keys of moe_dist/config.py. Exit status: 0 fits, 1 does not fit, 2 bad input.

The fake-CUDA shim must be loaded before torch is imported, so this module imports torch only inside ``main``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moe_dist.config import Config, register_configs
from moe_dist.planning.fake_cuda import ShimError, load_shim

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
register_configs()


def _error(message: str) -> None:
    print(f"moe_dist.plan: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(dict_cfg: DictConfig) -> None:
    import json

    from moe_dist.planning.planner import make_plan, render, to_json
    from moe_dist.planning.search import render_search, search, search_json

    cfg: Config = OmegaConf.to_object(dict_cfg)
    try:
        if cfg.plan.search:
            result = search(cfg)
            print(render_search(result))
            payload, fits = search_json(result), bool(result.feasible)
        else:
            plan = make_plan(cfg)
            print(render(plan))
            payload, fits = to_json(plan), plan.fits
    except ValueError as err:  # bad input: one line naming the key and the value
        _error(str(err))
    if cfg.plan.json:
        Path(cfg.plan.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.plan.json).write_text(json.dumps(payload, indent=1))
    sys.exit(0 if fits else 1)


def run() -> None:
    """Loads the shim first (re-executing in a fresh interpreter when torch is already imported here)."""
    try:
        load_shim()
    except ShimError as err:
        if "torch" in sys.modules and "before torch is imported" in str(err):
            os.execv(sys.executable, [sys.executable, "-m", "moe_dist.plan", *sys.argv[1:]])
        _error(str(err))
    # Hydra writes nothing for a plan: no output directory, no log files.
    sys.argv += [
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    main()


if __name__ == "__main__":
    run()
