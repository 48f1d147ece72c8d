"""Training runs: the same losses at any (world, ep), exact resume, resharding resume, wandb offline.

One spawn of two gloo ranks runs every world-2 job in sequence; world-1 jobs run in this process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from harness import spawn_ranks
from training_runs import run

from moe_dist.checkpoint import complete_checkpoints, read_meta
from moe_dist.metrics import read_metrics

STEPS = 6
TOL = 1e-4


def losses(run_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def world2_jobs(rank: int, world_size: int, root: str) -> None:
    run(
        [
            "parallel.ep=2",
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=4",
            "trainer.ckpt_every=3",
            f"trainer.out_dir={root}/w2_ep2",
        ]
    )
    run(
        [
            "parallel.ep=1",
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=4",
            f"trainer.out_dir={root}/w2_ep1",
        ]
    )
    # Preempted after step 3, then restarted with resume=auto in the same run directory.
    for extra in (["trainer.stop_at_step=3"], []):
        run(
            [
                "parallel.ep=2",
                f"trainer.max_steps={STEPS}",
                "trainer.micro_batch_size=4",
                f"trainer.out_dir={root}/w2_ep2_resumed",
                *extra,
            ]
        )
    run(["model.moe.num_experts=0", "trainer.max_steps=3", "trainer.micro_batch_size=4",
         f"trainer.out_dir={root}/w2_dense"])  # fmt: skip
    run(["parallel.ep=2", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4",
         "model.moe.recv_budget=64", f"trainer.out_dir={root}/w2_ep2_budget"])  # fmt: skip
    # The ep=2 checkpoint of step 3, resumed with the experts unsharded.
    run(
        [
            "parallel.ep=1",
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=4",
            f"trainer.out_dir={root}/w2_ep1_from_ep2",
            f"trainer.resume={root}/w2_ep2/checkpoints/step_3",
        ]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    spawn_ranks(2, world2_jobs, str(root))
    run(
        [
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=8",
            f"trainer.out_dir={root}/w1",
            "logging.wandb.mode=offline",
        ]
    )
    run(
        [
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=8",
            f"trainer.out_dir={root}/w1_from_ep2",
            f"trainer.resume={root}/w2_ep2/checkpoints/step_3",
        ]
    )
    run(["model.moe.num_experts=0", "trainer.max_steps=3", "trainer.micro_batch_size=8",
         f"trainer.out_dir={root}/w1_dense"])  # fmt: skip
    return root


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) < TOL, f"step {step}: loss {a[step]:.6f} vs {b[step]:.6f}"


def test_losses_fall_and_are_finite(runs):
    w1 = losses(runs / "w1")
    assert sorted(w1) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in w1.values())
    assert w1[STEPS] < w1[1] - 0.1, "six steps of training should lower the loss"


@pytest.mark.parametrize("layout", ["w2_ep2", "w2_ep1"])
def test_same_loss_at_every_step_for_any_world_and_ep(runs, layout):
    assert_same_losses(losses(runs / "w1"), losses(runs / layout), range(1, STEPS + 1))


def test_receive_budget_splits_the_exchange_without_changing_the_run(runs):
    assert_same_losses(losses(runs / "w1"), losses(runs / "w2_ep2_budget"), range(1, STEPS + 1))
    rounds = [r["exchange_rounds"] for r in read_metrics(runs / "w2_ep2_budget") if "loss" in r]
    assert min(rounds) >= 2, rounds  # 4 x 32 tokens x top-2 = 256 rows per rank against a budget of 64
    assert {r["exchange_rounds"] for r in read_metrics(runs / "w2_ep2") if "loss" in r} == {1}


def test_dense_model_trains_the_same_at_world_1_and_2(runs):
    assert_same_losses(losses(runs / "w1_dense"), losses(runs / "w2_dense"), [1, 2, 3])


def test_resume_after_preemption_continues_the_same_trajectory(runs):
    resumed = losses(runs / "w2_ep2_resumed")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # metrics.jsonl continued, no step twice
    assert_same_losses(losses(runs / "w2_ep2"), resumed, range(1, STEPS + 1))


@pytest.mark.parametrize("layout", ["w1_from_ep2", "w2_ep1_from_ep2"])
def test_ep2_checkpoint_resumes_at_other_layouts(runs, layout):
    resharded = losses(runs / layout)
    assert sorted(resharded) == [4, 5, 6]
    assert_same_losses(losses(runs / "w2_ep2"), resharded, [4, 5, 6])


def test_checkpoints_record_layout_and_are_complete(runs):
    found = complete_checkpoints(runs / "w2_ep2")
    assert [step for step, _ in found] == [3, 6]
    meta = read_meta(found[-1][1])
    assert (meta["step"], meta["world_size"], meta["ep"]) == (6, 2, 2)
    assert meta["model"]["moe"]["num_experts"] == 4
    assert not list((runs / "w2_ep2" / "checkpoints").glob(".tmp_*"))


def tiny_flops_per_token() -> float:
    from training_runs import TINY, compose_config

    from moe_dist.model.transformer import Transformer, model_flops_per_token

    return model_flops_per_token(Transformer(compose_config(TINY).model))


def test_metrics_records_have_every_field(runs):
    records = read_metrics(runs / "w2_ep2")
    train = [r for r in records if "loss" in r]
    for r in train:
        assert {
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "aux_loss",
            "z_loss",
            "dropped_frac",
            "expert_load",
            "model_tflops_per_rank",
            "mfu",
        } <= set(r)
        assert len(r["expert_load"]) == 2  # two MoE layers
        # MFU: model FLOPs per token x tokens/s over 2 ranks, against this CPU's measured GEMM peak
        per_token = r["model_tflops_per_rank"] * 1e12 * 2 / r["tokens_per_s"]
        assert per_token == pytest.approx(tiny_flops_per_token(), rel=1e-9)
        assert 0 < r["mfu"] < 1.5  # can exceed 1 only by noise in the peak measurement
        for layer in r["expert_load"]:
            assert len(layer) == 4 and abs(sum(layer) - 1) < 1e-9


def test_wandb_offline_run_written(runs):
    offline = list((runs / "w1" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "the offline run holds its data file"
