"""Starting a run from trained weights: fine-tuning a moe_dist checkpoint at another world size, EP degree and
engine (fresh optimizer, schedule and data; optional frozen groups), and sparse upcycling of a dense checkpoint.

One spawn of two gloo ranks pre-trains the MoE at world 2 / EP 2, and upcycles a dense checkpoint at EP 2.
"""

from __future__ import annotations

import json

import pytest
import torch
from harness import spawn_ranks
from training_runs import TINY, compose_config, run

from moe_dist.model.build import load_model
from moe_dist.parallel.mesh import single_process_mesh
from moe_dist.trainer import build_run, lm_loss, train_step

pytestmark = pytest.mark.usefixtures("one_thread")
DENSE = ["model.moe.num_experts=0", "model.ffn_hidden=32"]  # expert_hidden=32 in TINY: experts copy this FFN


def fixed_batch(vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(vocab, (4, 33), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def world2_jobs(rank: int, world_size: int, root: str) -> dict:
    run(
        [
            "parallel.ep=2",
            "trainer.max_steps=3",
            "trainer.micro_batch_size=4",
            f"trainer.out_dir={root}/pretrain",
        ]
    )
    # Upcycling at EP 2: each rank copies the dense FFN into its own two experts.
    cfg = compose_config(
        [*TINY, "parallel.ep=2", "trainer.micro_batch_size=4", f"model.init_from={root}/dense"]
    )
    upcycled = build_run(cfg).model.eval()
    with torch.no_grad():
        upcycled_ce = lm_loss(upcycled, *fixed_batch()).item()
    # Fine-tuning the EP-2 checkpoint at EP 1 under DeepSpeed ZeRO-1: the same starting weights.
    cfg = compose_config(
        [*TINY, "parallel.ep=1", "engine=deepspeed", "engine.zero_stage=1", "trainer.micro_batch_size=4",
         f"model.init_from={root}/pretrain"]
    )  # fmt: skip
    ds_run = build_run(cfg)
    start = {k: v.detach().clone() for k, v in ds_run.model.named_parameters()}
    train_step(ds_run, 1)
    moved = [k for k, v in ds_run.model.named_parameters() if not torch.equal(v, start[k])]
    # Frozen groups under ZeRO-2 at EP 2 (experts in DeepSpeed's expert groups): frozen stay, the rest moves.
    cfg = compose_config(
        [*TINY, "parallel.ep=2", "engine=deepspeed", "engine.zero_stage=2", "trainer.micro_batch_size=4",
         f"model.init_from={root}/pretrain", "trainer.freeze=[router,embeddings]"]
    )  # fmt: skip
    frozen_run = build_run(cfg)
    frozen_start = {k: v.detach().clone() for k, v in frozen_run.model.named_parameters()}
    train_step(frozen_run, 1)
    frozen_moved = {k: not torch.equal(v, frozen_start[k]) for k, v in frozen_run.model.named_parameters()}
    # The same under the native engine at EP 2, gradients all-reduced in flight during backward (the frozen
    # tensors get no bucket) and after it: the same step to the bit.
    native_after = {}
    for overlap in (True, False):
        cfg = compose_config(
            [*TINY, "parallel.ep=2", "trainer.micro_batch_size=4", f"model.init_from={root}/pretrain",
             "trainer.freeze=[router,embeddings]", f"engine.overlap_grad_sync={str(overlap).lower()}"]
        )  # fmt: skip
        native_run = build_run(cfg)
        train_step(native_run, 1)
        native_after[overlap] = {k: v.detach().clone() for k, v in native_run.model.named_parameters()}
    return {
        "upcycled_ce": upcycled_ce,
        "deepspeed_start": start,
        "deepspeed_moved": moved,
        "zero2_frozen_moved": frozen_moved,
        "native_frozen_moved": {
            k: not torch.equal(v, frozen_start[k]) for k, v in native_after[True].items()
        },
        "native_overlap_equal": all(
            torch.equal(v, native_after[False][k]) for k, v in native_after[True].items()
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    run([*DENSE, "trainer.max_steps=4", f"trainer.out_dir={root}/dense"])
    results = spawn_ranks(2, world2_jobs, str(root))
    return {"root": root, "world2": results}


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_finetune_starts_from_the_weights_with_a_fresh_optimizer_schedule_and_data(runs, tmp_path):
    """Pre-trained at world 2 / EP 2 on the stdlib; fine-tuned at world 1 on another corpus."""
    pretrain = runs["root"] / "pretrain"
    (tmp_path / "corpus").mkdir()
    for i in range(12):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"note {i}: the quick brown fox jumps. " * 40)
    overrides = [
        *TINY,
        f"model.init_from={pretrain}",
        "data.name=text",
        f"data.path={tmp_path / 'corpus'}",
        "trainer.max_steps=3",
        "trainer.freeze=[router,embeddings]",
        f"trainer.out_dir={tmp_path / 'ft'}",
    ]
    trained, meta = load_model(pretrain, mesh=single_process_mesh(), device=torch.device("cpu"))
    assert (meta["world_size"], meta["ep"], meta["step"]) == (2, 2, 3)
    fresh = build_run(compose_config(overrides))
    start = params_of(fresh.model)
    for name, p in params_of(trained).items():  # every weight, experts gathered from both EP ranks
        assert torch.equal(start[name], p), name
    assert all(not s for s in fresh.engine.optimizer.state.values())  # no optimizer state came along
    for rank in runs["world2"]:  # world 2, EP 1, DeepSpeed ZeRO-1 starts from the same weights, then trains
        assert all(torch.equal(rank["deepspeed_start"][k], v) for k, v in start.items())
        assert len(rank["deepspeed_moved"]) == len(start)
    frozen = {n for n, p in fresh.model.named_parameters() if not p.requires_grad}
    assert frozen == {"tok_embeddings.weight", "output.weight"} | {
        f"layers.{i}.ffn.router.weight" for i in range(2)
    }
    for rank in runs[
        "world2"
    ]:  # the same groups frozen under ZeRO-2 at world 2 / EP 2 (its own expert shards)
        assert {k for k, moved in rank["zero2_frozen_moved"].items() if not moved} == frozen
        assert {k for k, moved in rank["native_frozen_moved"].items() if not moved} == frozen
        assert rank["native_overlap_equal"]

    run_dir = run(overrides[len(TINY) :])
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # a new run: step 1, warm-up from the start
    assert steps[0]["lr"] == pytest.approx(3e-3 * 1 / 2)
    tuned, _ = load_model(run_dir, mesh=single_process_mesh(), device=torch.device("cpu"))
    for name, p in params_of(tuned).items():
        assert torch.equal(p, start[name]) == (name in frozen), name


def test_upcycled_model_computes_the_dense_function_at_step_0(runs, tmp_path):
    dense, _ = load_model(runs["root"] / "dense", mesh=single_process_mesh(), device=torch.device("cpu"))
    cfg = compose_config([*TINY, f"model.init_from={runs['root'] / 'dense'}", "trainer.max_steps=3"])
    upcycled = build_run(cfg).model
    with torch.no_grad():
        dense_ce = lm_loss(dense, *fixed_batch()).item()
        ce = lm_loss(upcycled.eval(), *fixed_batch()).item()
    assert abs(ce - dense_ce) < 1e-6
    assert all(abs(r["upcycled_ce"] - dense_ce) < 1e-6 for r in runs["world2"])  # at EP 2 as well
    ffn = dense.layers[0].ffn
    experts = upcycled.layers[0].ffn.experts
    assert torch.equal(experts.w_down, ffn.w_down.weight.t().expand(4, -1, -1))
    assert torch.equal(experts.w_gate_up[2, :, :32], ffn.w_gate.weight.t())
    # Without norm_topk the selected weights sum to less than 1: not the dense function (the check can fail).
    cfg = compose_config([*TINY, f"model.init_from={runs['root'] / 'dense'}", "model.moe.norm_topk=false"])
    with pytest.warns(UserWarning, match="does not start from the dense model's function"):
        unnormalised = build_run(cfg).model.eval()
    with torch.no_grad():
        assert abs(lm_loss(unnormalised, *fixed_batch()).item() - dense_ce) > 2e-5

    # ... and it trains on: the experts of a block drift apart.
    run_dir = run(
        [f"model.init_from={runs['root'] / 'dense'}", "trainer.max_steps=3", f"trainer.out_dir={tmp_path}"]
    )
    trained, _ = load_model(run_dir, mesh=single_process_mesh(), device=torch.device("cpu"))
    w = trained.layers[0].ffn.experts.w_down
    assert (w[0] - w[1]).abs().max() > 1e-5


def test_bad_init_from_is_refused_before_anything_runs(runs, tmp_path):
    dense, pretrain = runs["root"] / "dense", runs["root"] / "pretrain"
    cases = [
        ([f"model.init_from={tmp_path / 'nope'}"], "neither a moe_dist checkpoint or run directory"),
        ([f"model.init_from={pretrain}", "model.dim=64"], r"model.dim: checkpoint 32 vs run 64"),
        (
            [f"model.init_from={dense}", "model.moe.expert_hidden=16"],
            "must equal the dense model's ffn_hidden=32",
        ),
        ([f"model.init_from={dense}", "model.moe.num_shared_experts=1"], "would double its output"),
        (["trainer.freeze=[router,dense,experts,embeddings]"], "leaves nothing to train"),
        (["trainer.freeze=[attention]"], "must list distinct groups"),
        ([*DENSE, "trainer.freeze=[dense,embeddings]"], "leaves no parameter of this model to train"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            run([*overrides, f"trainer.out_dir={tmp_path / 'out'}"])
        assert not (tmp_path / "out").exists()
