"""Runs several plans in one fresh process (the fake-CUDA shim loads before torch) and prints them as JSON.

    python tests/plan_driver.py '<json: {"name": [overrides, ...], ...}>'

Used by tests/test_plan.py: one process and one torch import for many plans.
"""

from __future__ import annotations

from moe_dist.planning.fake_cuda import load_shim

load_shim()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_runs import compose_config  # noqa: E402

from moe_dist.planning.planner import make_plan, to_json  # noqa: E402


def main() -> None:
    jobs = json.loads(sys.argv[1])
    out = {}
    for name, overrides in jobs.items():
        started = time.perf_counter()
        plan = make_plan(compose_config(overrides))
        out[name] = {**to_json(plan), "wall_s": time.perf_counter() - started}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
