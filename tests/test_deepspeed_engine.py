"""The DeepSpeed engine (ZeRO-0/1/2 over moe_dist's edp x ep mesh) against the native engine (and the fsdp
engine: equal runs, and checkpoints resumed across the two).

One spawn of two gloo ranks runs every job in sequence: whole training runs through the trainer (same loss and
grad norm at every step with clipping active, cross-engine resume across EP sizes), then the engines driven
directly (gradient accumulation, a skipped non-finite step, optimizer slots, optimizer-state memory, save and
load memory with native, ZeRO and fsdp). An fsdp run at world 1 in this process, before and after the spawn,
saves a checkpoint that ZeRO-2 resumes at world 2 and resumes one of ZeRO-2's. The
config checks run in this process and need no DeepSpeed import (DeepSpeed picks its accelerator at import:
the engine imports it, for the CPU here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import spawn_ranks
from training_runs import TINY, compose_config, run

from moe_dist.checkpoint import (
    SafeFileSystemReader,
    checkpoint_group,
    load_checkpoint,
    model_state,
    read_tensors,
    save_checkpoint,
    saved_tensors,
)
from moe_dist.config import EngineConfig, TrainerConfig
from moe_dist.engines import build_engine
from moe_dist.engines.deepspeed import DeepSpeedEngine, deepspeed_config
from moe_dist.metrics import read_metrics
from moe_dist.model.build import build_model
from moe_dist.optim import lr_at
from moe_dist.parallel.apply import split_parameters
from moe_dist.parallel.layout import pieces_of
from moe_dist.parallel.mesh import build_mesh
from moe_dist.trainer import lm_loss

STEPS = 6
TOL = 1e-4
CLIP = 1.5  # inside the range of these runs' grad norms (about 1.3 to 1.9): some steps clip, some do not
# Two micro-batches per rank and step at world 2: the accumulation boundary is exercised.
COMMON = [f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", f"trainer.grad_clip={CLIP}"]
DEEPSPEED = ["engine=deepspeed"]
BF16 = ["+engine.deepspeed.bf16.enabled=true"]
ACCUMULATE_FP32 = "+engine.deepspeed.data_types.grad_accum_dtype=fp32"
BF16_TOL = {"loss": 2e-3, "grad_norm": 1e-2}  # bf16 parameters: about 3 significant digits
RUNS = {
    "native_ep2": ["parallel.ep=2", "trainer.ckpt_every=3"],
    "native_ep1": ["parallel.ep=1"],
    "zero0_ep2": ["parallel.ep=2", *DEEPSPEED, "engine.zero_stage=0"],
    "zero1_ep2": ["parallel.ep=2", *DEEPSPEED, "engine.zero_stage=1"],
    "zero2_ep2": ["parallel.ep=2", *DEEPSPEED, "engine.zero_stage=2", "trainer.ckpt_every=3"],
    "zero1_ep1": ["parallel.ep=1", *DEEPSPEED, "engine.zero_stage=1"],
    "zero2_ep1": ["parallel.ep=1", *DEEPSPEED, "engine.zero_stage=2"],
    # DeepSpeed bf16 (bf16 parameters, fp32 master partitions): ZeRO-1 with fp32 gradient accumulation runs
    # DeepSpeed's BF16 optimizer, ZeRO-2 its ZeRO optimizer on bf16 gradients. CPU bf16 here, as on CUDA.
    "bf16_zero1_ep1": [
        "parallel.ep=1",
        *DEEPSPEED,
        "engine.zero_stage=1",
        *BF16,
        ACCUMULATE_FP32,
        "trainer.ckpt_every=3",
    ],
    "bf16_zero2_ep2": ["parallel.ep=2", *DEEPSPEED, "engine.zero_stage=2", *BF16, "trainer.ckpt_every=3"],
    # The same runs resumed from their step-3 checkpoints (same world, EP and engine).
    "bf16_zero1_ep1_resumed": [
        "parallel.ep=1",
        *DEEPSPEED,
        "engine.zero_stage=1",
        *BF16,
        ACCUMULATE_FP32,
        "trainer.resume={root}/bf16_zero1_ep1/checkpoints/step_3",
    ],
    "bf16_zero2_ep2_resumed": [
        "parallel.ep=2",
        *DEEPSPEED,
        "engine.zero_stage=2",
        *BF16,
        "trainer.resume={root}/bf16_zero2_ep2/checkpoints/step_3",
    ],
    "fsdp_ep2": ["parallel.ep=2", "engine=fsdp", "trainer.ckpt_every=3"],
    # Activation checkpointing under ZeRO-2: the same run.
    "zero2_ep2_ac_full": [
        "parallel.ep=2",
        *DEEPSPEED,
        "engine.zero_stage=2",
        "trainer.activation_checkpointing=full",
    ],
    # Cross-engine resume from the step-3 checkpoints above, at the other EP size.
    "native_ep1_from_zero2_ep2": ["parallel.ep=1", "trainer.resume={root}/zero2_ep2/checkpoints/step_3"],
    "zero2_ep1_from_native_ep2": [
        "parallel.ep=1",
        *DEEPSPEED,
        "engine.zero_stage=2",
        "trainer.resume={root}/native_ep2/checkpoints/step_3",
    ],
    "fsdp_ep1_from_zero2_ep2": [
        "parallel.ep=1",
        "engine=fsdp",
        "trainer.resume={root}/zero2_ep2/checkpoints/step_3",
    ],
    "zero2_ep1_from_fsdp_ep2": [
        "parallel.ep=1",
        *DEEPSPEED,
        "engine.zero_stage=2",
        "trainer.resume={root}/fsdp_ep2/checkpoints/step_3",
    ],
    # Across world sizes: the world-1 fsdp run (WORLD1_BEFORE) resumed by ZeRO-2 at world 2.
    "zero2_ep2_from_fsdp_w1": [
        "parallel.ep=2",
        *DEEPSPEED,
        "engine.zero_stage=2",
        "trainer.resume={root}/fsdp_w1/checkpoints/step_3",
    ],
}
# World 1 in this process, before and after the world-2 runs; 2 micro-steps of 4 sequences, the micro-steps
# of world 2 with trainer.micro_batch_size=2 (the same function; fsdp starts a one-rank process group).
WORLD1 = ["trainer.accum_steps=2", "engine=fsdp"]
WORLD1_BEFORE = {"fsdp_w1": [*WORLD1, "trainer.ckpt_every=3"]}
WORLD1_AFTER = {"fsdp_w1_from_zero2_ep2": [*WORLD1, "trainer.resume={root}/zero2_ep2/checkpoints/step_3"]}
ENGINE_CASES = {  # (ep, engine overrides) for the engine-level checks
    "native_ep1": (1, []),
    "zero1_ep1": (1, [*DEEPSPEED, "engine.zero_stage=1"]),
    "zero2_ep1": (1, [*DEEPSPEED, "engine.zero_stage=2"]),
    "native_ep2": (2, []),
    "zero0_ep2": (2, [*DEEPSPEED, "engine.zero_stage=0"]),
    "zero2_ep2": (2, [*DEEPSPEED, "engine.zero_stage=2"]),
}
NAN_STEP = 2  # the engine-level trajectory poisons this step's loss: the step must be skipped cleanly
MEMORY_MODEL = ["model.dim=128", "model.n_heads=4", "model.moe.num_experts=8", "model.moe.expert_hidden=512"]
MEMORY_CASES = {
    "native": [],
    "zero2": [*DEEPSPEED, "engine.zero_stage=2"],
    "bf16_zero1": [*DEEPSPEED, "engine.zero_stage=1", *BF16, ACCUMULATE_FP32],
    "fsdp": ["engine=fsdp"],
}


def memory(engine, model) -> dict[str, int]:
    """Bytes this rank holds of AdamW state and of fp32 master copies beside the model; the model's sizes."""
    adam = getattr(engine, "adam", None) or engine.optimizer
    dense, experts = split_parameters(model)
    # Under ZeRO the basic optimizer steps fp32 partitions, which are copies; native steps the model's tensors.
    model_ids = {id(p) for p in model.parameters()}
    masters = [p for g in adam.param_groups for p in g["params"] if id(p) not in model_ids]
    return {
        "adam_state": sum(t.numel() * t.element_size() for s in adam.state.values() for t in s.values()),
        "fp32_masters": sum(p.numel() * p.element_size() for p in masters),
        "dense_numel": sum(p.numel() for p in dense),
        "local_expert_numel": sum(p.numel() for p in experts),
    }


def expert_partition_groups(engine, mesh) -> list[bool]:
    """For each ZeRO param group holding experts: is its partition group moe_dist's own EDP group?"""
    zero = engine.ds.optimizer if isinstance(engine, DeepSpeedEngine) else None
    if not hasattr(zero, "is_moe_param_group"):  # native, or DeepSpeed stage 0
        return []
    edp = mesh.device_mesh.get_group("edp")
    return [zero.real_dp_process_group[i] is edp for i, moe in enumerate(zero.is_moe_param_group) if moe]


def engine_trajectory(rank: int, ep: int, overrides: list[str]) -> dict:
    """Three optimizer steps driven as the trainer does (two micro-batches each), the second one non-finite."""
    cfg = compose_config([*TINY, f"parallel.ep={ep}", "trainer.micro_batch_size=2", *overrides])
    mesh = build_mesh(ep=ep, num_experts=cfg.model.moe.num_experts)
    model = build_model(cfg, mesh, torch.device("cpu"))
    engine = build_engine(model, engine=cfg.engine, trainer=cfg.trainer, mesh=mesh)
    generator = torch.Generator().manual_seed(1000 + rank)
    norms = []
    for step in range(1, 4):
        engine.set_lr(lr_at(step, cfg.trainer))
        for micro in range(2):
            tokens = torch.randint(cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=generator)
            inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            loss = (lm_loss(model, inputs, targets) + model.moe_loss()) / 2
            if step == NAN_STEP:
                loss = loss * math.nan
            engine.backward(loss, last_micro_batch=micro == 1)
        norm = engine.reduce_gradients()
        norms.append(norm.item())
        if math.isfinite(norms[-1]):
            engine.step(norm, max_norm=CLIP)
        engine.zero_grad()
    return {
        "norms": norms,
        "params": {name: p.detach().float().clone() for name, p in model.named_parameters()},
        "state": held_pieces(engine.checkpoint_state()),
        "memory": memory(engine, model),
        "expert_groups_are_mesh_edp": expert_partition_groups(engine, mesh),
    }


def held_pieces(state: dict) -> dict[str, tuple[tuple[int, ...], list]]:
    """What this rank hands a checkpoint: global shape and (offsets, copy) of every piece it holds."""
    out = {}
    for key, value in state.items():
        shape, parts = pieces_of(value)
        out[key] = (shape, [(offsets, t.detach().float().clone()) for offsets, t in parts])
    return out


def assemble(by_rank: list[tuple[tuple[int, ...], list]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global tensor from every rank's pieces, and how many pieces cover each element (replicas count)."""
    shape = by_rank[0][0]
    full, cover = torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.int64)
    for _, parts in by_rank:
        for offsets, t in parts:
            region = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
            full[region], cover[region] = t, cover[region] + 1
    return full, cover


def process_memory(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_above_now(fn) -> int:
    """Peak resident memory while ``fn`` runs, above the resident memory when it starts (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = process_memory("VmRSS")
    fn()
    return process_memory("VmHWM") - before


def checkpoint_memory(rank: int, root: str, overrides: list[str]) -> dict[str, int]:
    """Peak memory above the live state of one training step, one save and one load (world 2, ep 1), on a
    model whose parameters dwarf its activations (3.3M parameters, 2x32 tokens per micro-batch)."""
    cfg = compose_config([*TINY, *MEMORY_MODEL, "trainer.micro_batch_size=2", *overrides])
    mesh = build_mesh(ep=1, num_experts=cfg.model.moe.num_experts)
    model = build_model(cfg, mesh, torch.device("cpu"))
    engine = build_engine(model, engine=cfg.engine, trainer=cfg.trainer, mesh=mesh)
    group = checkpoint_group()
    generator = torch.Generator().manual_seed(rank)

    def step() -> None:
        for micro in range(2):
            tokens = torch.randint(cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=generator)
            loss = lm_loss(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()) + model.moe_loss()
            engine.backward(loss / 2, last_micro_batch=micro == 1)
        engine.step(engine.reduce_gradients(), max_norm=CLIP)
        engine.zero_grad()

    def state() -> dict:
        engine_state = engine.checkpoint_state()  # first: fsdp reshards there
        return model_state(model, mesh) | engine_state

    def save() -> None:
        meta = {"model": dataclasses.asdict(cfg.model)}
        save_checkpoint(root, step=1, state=state(), meta=meta, keep=1, group=group)

    def load() -> None:
        loaded = state()
        load_checkpoint(
            f"{root}/checkpoints/step_1", state=loaded, model_cfg=dataclasses.asdict(cfg.model), group=group
        )
        engine.after_checkpoint_load(loaded)

    step()
    step()  # every buffer of a step exists now
    pieces = [t for value in state().values() for _, t in pieces_of(value)[1]]
    return {
        "step": peak_above_now(step),
        "save": peak_above_now(save),
        "load": peak_above_now(load),
        "largest_piece": max(t.numel() * t.element_size() for t in pieces),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held": sum(t.numel() * t.element_size() for t in pieces),
    }


def run_all(runs: dict[str, list[str]], root: str) -> None:
    for name, overrides in runs.items():
        run([*COMMON, *(o.format(root=root) for o in overrides), f"trainer.out_dir={root}/{name}"])


def run_world1(runs: dict[str, list[str]], root: str) -> None:
    try:
        run_all(runs, root)
    finally:
        if dist.is_initialized():  # fsdp's one-rank process group
            dist.destroy_process_group()


def world2_jobs(rank: int, world_size: int, root: str) -> dict:
    run_all(RUNS, root)
    out = {name: engine_trajectory(rank, ep, overrides) for name, (ep, overrides) in ENGINE_CASES.items()}
    out["memory"] = {
        name: checkpoint_memory(rank, f"{root}/memory_{name}", o) for name, o in MEMORY_CASES.items()
    }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, list[dict]]:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e .[deepspeed])")
    root = tmp_path_factory.mktemp("ds_runs")
    # Large blocks come from mmap and go back to the system when freed, so that resident memory follows what
    # is allocated and its peak (VmHWM) measures a phase's own allocations.
    saved, os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_"), str(1 << 17)
    try:
        run_world1(WORLD1_BEFORE, str(root))
        ranks = spawn_ranks(2, world2_jobs, str(root))
        run_world1(WORLD1_AFTER, str(root))
        return root, ranks
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def assert_same_run(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) < TOL, (
                f"step {step}: {key} {a[step][key]} vs {b[step][key]}"
            )


@pytest.mark.parametrize("ep", [2, 1])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_native_loss_and_grad_norm_at_every_step(results, stage, ep):
    root, _ = results
    native, zero = records(root / f"native_ep{ep}"), records(root / f"zero{stage}_ep{ep}")
    assert sorted(zero) == list(range(1, STEPS + 1))
    assert_same_run(native, zero, range(1, STEPS + 1))
    clipped = sum(r["grad_norm"] > CLIP for r in zero.values())
    assert 0 < clipped < STEPS, f"clipping acted at {clipped}/{STEPS} steps: move CLIP into the norms' range"
    delta = {k: max(abs(native[s][k] - zero[s][k]) for s in native) for k in ("loss", "grad_norm")}
    print(
        f"ZeRO-{stage} ep {ep}: max |loss - native| {delta['loss']:.2e}, max |grad_norm - native| "
        f"{delta['grad_norm']:.2e}, clipped at {clipped}/{STEPS} steps"
    )


@pytest.mark.parametrize("case", ["bf16_zero1_ep1", "bf16_zero2_ep2"])
def test_bf16_zero_follows_native_within_bf16_precision(results, case):
    root, _ = results
    native, zero = records(root / f"native_{case[-3:]}"), records(root / case)
    assert sorted(zero) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key, tol in BF16_TOL.items():
            assert abs(native[step][key] - zero[step][key]) < tol * native[step][key], (step, key)
    relative = {
        k: max(abs(native[s][k] - zero[s][k]) / native[s][k] for s in native) for k in ("loss", "grad_norm")
    }
    print(
        f"{case}: max relative difference to native: loss {relative['loss']:.1e}, grad_norm {relative['grad_norm']:.1e}"
    )


@pytest.mark.parametrize("case", ["bf16_zero1_ep1", "bf16_zero2_ep2"])
def test_bf16_resume_restores_the_fp32_masters_bitwise(results, case):
    """Checkpoints of a bf16 DeepSpeed run hold its fp32 master weights (not the bf16 model weights), and a
    run resumed from step 3 ends at step 6 with the very masters and AdamW slots of the uninterrupted run."""
    root, _ = results
    uninterrupted = SafeFileSystemReader(str(root / case / "checkpoints" / "step_6"))
    resumed = SafeFileSystemReader(str(root / f"{case}_resumed" / "checkpoints" / "step_6"))
    saved = saved_tensors(uninterrupted)
    masters = [k for k in saved if k.startswith("model.") and not k.endswith("expert_bias")]
    assert masters and all(saved[k][1] == torch.float32 for k in masters)
    names = [k for k in saved if k.startswith(("model.", "optim."))]
    a, b = read_tensors(uninterrupted, names), read_tensors(resumed, names)
    for name in names:
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max():.3e}"
    # The bf16 model weights are a rounding of the masters: the masters carry more than bf16 holds.
    assert any(not torch.equal(a[k], a[k].bfloat16().float()) for k in masters)
    after, before = records(root / f"{case}_resumed"), records(root / case)
    assert sorted(after) == [4, 5, 6]
    assert all(after[s]["loss"] == before[s]["loss"] for s in after)


def test_save_and_load_memory_stay_within_a_piece_of_the_live_state(results):
    """Peak memory above the live state, per rank (world 2, ep 1, 3.3M parameters): a save holds at most
    about one piece beyond what the rank already holds, a checkpoint read about two (the record read and
    its copy), and a whole resume less than a training step's own transient memory; native, ZeRO-2, bf16
    ZeRO-1 and fsdp. Gathering full AdamW slots (8 bytes per parameter, as before this layout) would exceed
    each bound by far (and so does an fsdp engine whose checkpoint_state gathers its DTensors: tested)."""
    _, ranks = results
    mib = 2**20
    for rank, by_case in enumerate(ranks):
        for case, m in by_case["memory"].items():
            print(
                f"rank {rank} {case}: step {m['step'] / mib:.1f} MiB, save {m['save'] / mib:.1f} MiB, "
                f"load {m['load'] / mib:.1f} MiB above the live state (largest piece {m['largest_piece'] / mib:.1f} "
                f"MiB, pieces held {m['held'] / mib:.1f} MiB)"
            )
            slack = 2 * mib  # DCP's plans and metadata, the file buffers
            assert m["save"] <= 2 * m["largest_piece"] + slack, (rank, case, m)
            assert m["load"] <= max(3 * m["largest_piece"] + slack, m["step"]), (rank, case, m)
            assert m["save"] < m["step"] and m["load"] < m["step"], (rank, case, m)
            # What gathering full AdamW slots would add (8 bytes per parameter) is far above the save bound.
            assert 8 * m["parameters"] > 2 * (2 * m["largest_piece"] + slack)


@pytest.mark.parametrize("case", ["fsdp_ep2", "fsdp_w1"])
def test_fsdp_matches_native_with_clipping_and_accumulation(results, case):
    """fp32, two micro-steps, clipping active on some steps, fsdp at world 2 and at world 1 (the fp64 proofs:
    test_fsdp_engine.py)."""
    root, _ = results
    assert_same_run(records(root / "native_ep2"), records(root / case), range(1, STEPS + 1))


def test_activation_checkpointing_under_zero2_gives_the_same_run(results):
    root, _ = results
    assert_same_run(records(root / "zero2_ep2"), records(root / "zero2_ep2_ac_full"), range(1, STEPS + 1))


def test_zero0_matches_native(results):
    root, _ = results
    assert_same_run(records(root / "native_ep2"), records(root / "zero0_ep2"), range(1, STEPS + 1))


@pytest.mark.parametrize(
    ("resumed", "uninterrupted"),
    [
        ("native_ep1_from_zero2_ep2", "zero2_ep2"),
        ("zero2_ep1_from_native_ep2", "native_ep2"),
        ("fsdp_ep1_from_zero2_ep2", "zero2_ep2"),
        ("zero2_ep1_from_fsdp_ep2", "fsdp_ep2"),
        ("zero2_ep2_from_fsdp_w1", "fsdp_w1"),
        ("fsdp_w1_from_zero2_ep2", "zero2_ep2"),
    ],
)
def test_checkpoints_resume_across_engines_and_ep_sizes(results, resumed, uninterrupted):
    root, _ = results
    after = records(root / resumed)
    assert sorted(after) == [4, 5, 6]
    assert_same_run(records(root / uninterrupted), after, [4, 5, 6])


@pytest.mark.parametrize("case", ["zero1_ep1", "zero2_ep1", "zero0_ep2", "zero2_ep2"])
def test_engine_level_trajectory_equals_native_through_a_skipped_step(results, case):
    _, ranks = results
    native_case = "native_ep" + case[-1]
    for rank, by_case in enumerate(ranks):
        native, zero = by_case[native_case], by_case[case]
        assert math.isnan(zero["norms"][NAN_STEP - 1]) and math.isnan(native["norms"][NAN_STEP - 1])
        finite = [i for i in range(3) if i != NAN_STEP - 1]
        for i in finite:
            assert abs(native["norms"][i] - zero["norms"][i]) < 1e-5 * native["norms"][i]
        assert native["params"].keys() == zero["params"].keys()
        for name, p in native["params"].items():
            assert p.shape == zero["params"][name].shape, name  # experts: this rank's EP shard in both
            assert (p - zero["params"][name]).abs().max() < 1e-6, f"rank {rank} {name}"
        for name in native["params"]:  # two AdamW steps in both: the NaN step left no trace
            assert native["state"][f"optim.{name}.step"][1][0][1].item() == 2
            assert zero["state"][f"optim.{name}.step"][1][0][1].item() == 2


@pytest.mark.parametrize("case", ["zero1_ep1", "zero2_ep1", "zero2_ep2"])
def test_zero_checkpoint_state_is_its_own_fragments_of_the_global_tensors(results, case):
    """The masters and slots a ZeRO rank hands a checkpoint are the pieces it owns, no more: over both ranks
    they tile every global tensor exactly once, and each holds the native engine's values at its place."""
    _, ranks = results
    native_case = "native_ep" + case[-1]
    tensors = [k for k in ranks[0][case]["state"] if not k.endswith(".step")]
    for key in tensors:
        native, native_cover = assemble([r[native_case]["state"][key] for r in ranks])
        zero, zero_cover = assemble([r[case]["state"][key] for r in ranks])
        assert native_cover.min() >= 1, key
        assert zero_cover.min() == zero_cover.max() == 1, f"{key}: ZeRO pieces overlap or leave holes"
        assert (native - zero).abs().max() < 1e-6, key
    handed_over = sum(t.numel() for r in ranks for k in tensors for _, t in r[case]["state"][k][1])
    assert handed_over == sum(math.prod(ranks[0][case]["state"][k][0]) for k in tensors)


def test_zero_partitions_experts_over_moe_dists_edp_group(results):
    _, ranks = results
    for by_case in ranks:
        for case in ("zero1_ep1", "zero2_ep1", "zero2_ep2"):
            groups = by_case[case]["expert_groups_are_mesh_edp"]
            assert groups and all(groups), case


def test_zero2_holds_less_optimizer_state_per_rank(results):
    """AdamW keeps 8 bytes per element (exp_avg, exp_avg_sq in fp32) plus a 4-byte step per tensor; ZeRO
    partitions dense state over the world (2) and expert state over EDP (2 at ep 1, 1 at ep 2)."""
    _, ranks = results
    for ep, edp in ((1, 2), (2, 1)):
        for rank, by_case in enumerate(ranks):
            native, zero2 = by_case[f"native_ep{ep}"]["memory"], by_case[f"zero2_ep{ep}"]["memory"]
            print(
                f"world 2, ep {ep}, rank {rank}: AdamW state native {native['adam_state']:,} B, "
                f"ZeRO-2 {zero2['adam_state']:,} B (+ fp32 master partition {zero2['fp32_masters']:,} B)"
            )
            steps = 4 * len(by_case[f"native_ep{ep}"]["params"])
            assert native["adam_state"] == 8 * (native["dense_numel"] + native["local_expert_numel"]) + steps
            partitioned = 8 * (zero2["dense_numel"] / 2 + zero2["local_expert_numel"] / edp)
            # Above that: one 4-byte step per partition and DeepSpeed's alignment padding.
            assert partitioned <= zero2["adam_state"] < partitioned + 1024
            assert zero2["adam_state"] < native["adam_state"]


def test_deepspeed_config_derives_the_batch_layout_and_merges_pass_through_keys():
    engine = EngineConfig(
        name="deepspeed",
        zero_stage=2,
        deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": True}},
    )
    config = deepspeed_config(engine, TrainerConfig(global_batch_size=16, micro_batch_size=2), world_size=2)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (16, 2)
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.0
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["bf16"] == {"enabled": True}
    assert engine.deepspeed["zero_optimization"] == {"reduce_bucket_size": 1000}  # not modified


@pytest.mark.parametrize(
    ("stage", "extra", "message"),
    [
        (2, {"gradient_clipping": 1.0}, r"gradient_clipping=1.0: set by moe_dist from trainer.grad_clip"),
        (2, {"train_batch_size": 32}, r"engine.deepspeed.train_batch_size=32: set by moe_dist"),
        (2, {"optimizer": {"type": "Adam"}}, r"engine.deepspeed.optimizer=.*: set by moe_dist"),
        (
            1,
            {"zero_optimization": {"stage": 2}},
            r"zero_optimization.stage=2: the stage is engine.zero_stage=1",
        ),
        (2, {"fp16": {"enabled": True}}, r"engine.deepspeed.fp16: fp16 with loss scaling is not supported"),
        (0, {"bf16": {"enabled": True}}, r"engine.deepspeed.bf16: needs engine.zero_stage=1 or 2"),
        (
            2,
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            r"ZeRO-Offload is not supported",
        ),
    ],
)
def test_deepspeed_config_refuses_what_moe_dist_owns_or_does_not_support(stage, extra, message):
    engine = EngineConfig(name="deepspeed", zero_stage=stage, deepspeed=extra)
    with pytest.raises(ValueError, match=message):
        deepspeed_config(engine, TrainerConfig(), world_size=2)
