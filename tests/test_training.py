"""Training runs: the same losses at any (world, ep), exact resume, resharding resume, wandb offline.

One spawn of two gloo ranks runs every world-2 job in sequence; world-1 jobs run in this process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import spawn_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from training_runs import run

from moe_dist.checkpoint import (
    SafeFileSystemReader,
    checkpoint_group,
    complete_checkpoints,
    read_into,
    read_meta,
    read_tensors,
    save_checkpoint,
    select_checkpoint,
)
from moe_dist.metrics import read_metrics
from moe_dist.parallel.layout import flat_fragment, pieces_of

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
    # Background checkpoints every 2 steps; preempted after step 4, resumed from its step-4 checkpoint.
    for extra in (["trainer.stop_at_step=4"], []):
        run(["parallel.ep=2", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4", "trainer.ckpt_every=2",
             "trainer.async_checkpoint=true", f"trainer.out_dir={root}/w2_ep2_async", *extra])  # fmt: skip
    return corrupted_shard_of_rank_1(rank, root) | dtensors_to_fragments(rank, root)


def dtensors_to_fragments(rank: int, root: str) -> dict:
    """An engine whose state is DTensors (FSDP2-style: uneven Shard(0), and Shard(1) as for experts over EDP)
    hands them over as they are; read back whole in one process (the test) and, here, as ZeRO-style flat
    ranges of each tensor (rank r owns the r-th half of the flattened elements)."""
    group = checkpoint_group()
    device_mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)
    full = {
        "model.a": torch.randn(5, 6, generator=generator),
        "optim.b.exp_avg": torch.randn(4, 6, 8, generator=generator),
    }
    placements = {"model.a": [Shard(0)], "optim.b.exp_avg": [Shard(1)]}
    state = {k: distribute_tensor(t, device_mesh, placements[k]) for k, t in full.items()}
    held = sum(t.numel() for v in state.values() for _, t in pieces_of(v)[1])
    save_checkpoint(f"{root}/dtensors", step=1, state=state, meta={"model": {}}, keep=1, group=group)
    halves, loaded = {}, {}
    for key, t in full.items():
        start, stop = rank * t.numel() // 2, (rank + 1) * t.numel() // 2
        halves[key] = torch.zeros(stop - start)
        loaded[key] = flat_fragment(
            halves[key], local_shape=tuple(t.shape), start=start, global_shape=tuple(t.shape)
        )
    read_into(SafeFileSystemReader(f"{root}/dtensors/checkpoints/step_1"), loaded, group=group)
    expected = {
        k: t.reshape(-1)[rank * t.numel() // 2 : (rank + 1) * t.numel() // 2] for k, t in full.items()
    }
    return {
        "dtensor_pieces_held": held,
        "fragments_equal": all(torch.equal(halves[k], expected[k]) for k in full),
        "full": {k: t.tolist() for k, t in full.items()},
    }


def corrupted_shard_of_rank_1(rank: int, root: str) -> dict:
    """A copy of w2_ep2 whose newest checkpoint has one byte flipped in the file rank 1 wrote; verified by
    both ranks (each hashes its share), then resumed with resume=auto."""
    group = checkpoint_group()
    corrupt = Path(root) / "w2_ep2_corrupt"
    newest = corrupt / "checkpoints" / f"step_{STEPS}"
    if rank == 0:
        shutil.copytree(Path(root) / "w2_ep2", corrupt)
        (corrupt / "metrics.jsonl").unlink()
        written_by = read_meta(newest)["file_rank"]
        shard = newest / next(name for name, r in written_by.items() if r == 1)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier(group=group)
    selected = select_checkpoint("auto", corrupt, group=group)
    run(
        [
            "parallel.ep=2",
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=4",
            f"trainer.out_dir={corrupt}",
        ]
    )
    return {"selected": selected}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    (root / "ranks.json").write_text(json.dumps(spawn_ranks(2, world2_jobs, str(root))))
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


def test_async_checkpoints_resume_the_same_trajectory(runs):
    """Checkpoints written in the background (training went on meanwhile) hold the state of their step."""
    records = read_metrics(runs / "w2_ep2_async")
    resumed = losses(runs / "w2_ep2_async")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert_same_losses(losses(runs / "w2_ep2"), resumed, range(1, STEPS + 1))
    saves = [r for r in records if "checkpoint_stall_s" in r]
    assert [r["step"] for r in saves] == [2, 4, 6] and all(r["checkpoint_async"] for r in saves)
    assert {r["checkpoint_completed_step"] for r in records if "checkpoint_write_s" in r} >= {2, 6}
    assert [s for s, _ in complete_checkpoints(runs / "w2_ep2_async")] == [2, 4, 6]


def test_a_shard_corrupted_on_rank_1_is_found_by_the_distributed_check(runs):
    ranks = json.loads((runs / "ranks.json").read_text())
    for result in ranks:  # every rank reaches the same verdict
        path, warnings = result["selected"]
        assert path.endswith("step_3")
        assert len(warnings) == 1 and f"step {STEPS}" in warnings[0]
        assert "__1_0.distcp does not match its sha256 digest (corrupted)" in warnings[0]
    resumed = losses(runs / "w2_ep2_corrupt")
    assert sorted(resumed) == [4, 5, 6]  # resume=auto skipped the corrupted step-6 checkpoint
    assert_same_losses(losses(runs / "w2_ep2"), resumed, [4, 5, 6])


def test_every_rank_hashes_the_files_it_wrote(runs):
    meta = read_meta(complete_checkpoints(runs / "w2_ep2")[-1][1])
    assert meta["file_rank"] == {".metadata": 0, "__0_0.distcp": 0, "__1_0.distcp": 1}
    assert set(meta["sha256"]) == set(meta["file_bytes"]) == set(meta["file_rank"])


def test_dtensor_state_is_written_as_its_shards_and_read_back_in_any_layout(runs):
    """The hook for DTensor engines (FSDP2): each rank hands over only its shard (uneven on dim 0, or on dim 1),
    the checkpoint holds the global tensors, and ZeRO-style flat ranges read them back exactly."""
    ranks = json.loads((runs / "ranks.json").read_text())
    full = {k: torch.tensor(v) for k, v in ranks[0]["full"].items()}
    assert [r["dtensor_pieces_held"] for r in ranks] == [3 * 6 + 4 * 3 * 8, 2 * 6 + 4 * 3 * 8]
    assert all(r["fragments_equal"] for r in ranks)
    reader = SafeFileSystemReader(str(runs / "dtensors" / "checkpoints" / "step_1"))
    whole = read_tensors(reader, list(full))
    assert all(torch.equal(whole[k], full[k]) for k in full)
