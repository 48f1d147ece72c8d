"""The CLI rejects bad input within seconds, with one line naming key and value, and writes nothing.

The validator itself is covered case by case in test_config.py; these run the real entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

CASES = {
    "top_k": (["model.moe.top_k=9"], {}, "model.moe.top_k=9"),
    "world_ep": (["parallel.ep=3"], {"WORLD_SIZE": "2"}, "parallel.ep=3"),
    "batch": (
        ["trainer.global_batch_size=10", "trainer.micro_batch_size=4"],
        {},
        "trainer.global_batch_size=10",
    ),
    "data_path": (["data=text", "data.path=/no/such/dir/*.txt"], {}, "data.path='/no/such/dir/*.txt'"),
    "unknown_key": (["model.moe.num_expert=4"], {}, "num_expert"),
}
PREVIOUS_METRICS = '{"step": 1, "loss": 1.0}\n'


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Starts every case at once (each pays the torch import), then collects them."""
    procs = {}
    for name, (overrides, env, _) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        (root / "run").mkdir()
        (root / "run" / "metrics.jsonl").write_text(PREVIOUS_METRICS)
        args = [
            sys.executable,
            "-m",
            "moe_dist.train",
            f"trainer.out_dir={root}/run",
            f"hydra.run.dir={root}/hydra",
        ]
        full_env = {**os.environ, "MOE_DIST_RUN_STAMP": "cli_test", **env}
        proc = subprocess.Popen(
            args + overrides, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs[name] = (proc, root, time.perf_counter())
    results = {}
    for name, (proc, root, start) in procs.items():
        _, stderr = proc.communicate(timeout=180)
        results[name] = (proc.returncode, stderr, root, time.perf_counter() - start)
    return results


@pytest.mark.parametrize("name", [n for n in CASES if n != "unknown_key"])
def test_bad_config_is_rejected_before_anything_is_written(name, cli_results):
    returncode, stderr, root, seconds = cli_results[name]
    assert returncode == 2, stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("moe_dist: error:")]
    assert len(error_lines) == 1 and CASES[name][2] in error_lines[0], stderr
    assert [p.name for p in (root / "run").iterdir()] == ["metrics.jsonl"]
    assert (root / "run" / "metrics.jsonl").read_text() == PREVIOUS_METRICS
    assert seconds < 60


def test_unknown_override_key_is_rejected(cli_results):
    returncode, stderr, root, _ = cli_results["unknown_key"]
    assert returncode != 0
    assert "num_expert" in stderr
    assert (root / "run" / "metrics.jsonl").read_text() == PREVIOUS_METRICS
