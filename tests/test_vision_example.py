"""scripts/example_vision_moe.py at reduced size on two gloo ranks (EP=2): both routers learn the digits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from harness import spawn_ranks

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "example_vision_moe.py"


def run_example(rank: int, world_size: int, argv: list[str]) -> list[dict]:
    spec = importlib.util.spec_from_file_location("example_vision_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def without_timing(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_s"} for r in results]


def test_example_learns_digits_with_ep2():
    ranks = spawn_ranks(2, run_example, ["--steps", "80"])
    assert without_timing(ranks[0]) == without_timing(ranks[1])  # the reported numbers are all-reduced
    by_router = {r["router"]: r for r in ranks[0]}
    assert set(by_router) == {"softmax", "soft"}
    assert by_router["softmax"]["experts_per_token"] == 2 and by_router["soft"]["experts_per_token"] == 8
    for r in by_router.values():
        assert r["test_accuracy"] > 0.85, r  # chance is 0.1
    assert abs(by_router["soft"]["max_expert_share"] - 1 / 8) < 1e-6  # every expert sees every token
