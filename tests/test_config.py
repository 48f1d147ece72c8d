"""Config validation: every mistake is a ValueError naming the key and the value."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dist.config import (
    AUX_LOSS_SCOPES,
    BACKENDS,
    GROUPED_MM_MODES,
    PRECISIONS,
    ROUTERS,
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainerConfig,
    batch_layout,
    parse_activation_checkpointing,
    validate,
    validate_layout,
    validate_moe,
)


def config(*, moe=None, model=None, parallel=None, data=None, trainer=None) -> Config:
    m = replace(ModelConfig(), **(model or {}))
    m.moe = replace(MoEConfig(), **(moe or {}))
    return Config(
        model=m,
        parallel=replace(ParallelConfig(), **(parallel or {})),
        data=replace(DataConfig(), **(data or {})),
        trainer=replace(TrainerConfig(), **(trainer or {})),
    )


def raises_key(key, value):
    return pytest.raises(ValueError, match=re.escape(f"{key}={value!r}"))


@pytest.mark.parametrize("world", [1, 2])
def test_default_config_validates(world):
    assert validate(Config(), world_size=world) is None


def test_default_moe_validates_at_ep_1_2_4_8():
    for ep in (1, 2, 4, 8):
        assert validate_moe(MoEConfig(), dim=128, ep=ep) is None
        assert validate_layout(world_size=8, ep=ep, num_experts=8) is None


def test_num_experts_not_divisible_by_ep():
    with raises_key("model.moe.num_experts", 6):
        validate_moe(MoEConfig(num_experts=6), ep=4)
    with raises_key("model.moe.num_experts", 6) as e:
        validate_layout(world_size=8, ep=4, num_experts=6)
    assert "parallel.ep=4" in str(e.value)
    with raises_key("model.moe.num_experts", 6):
        validate(
            config(moe={"num_experts": 6}, parallel={"ep": 4}, trainer={"global_batch_size": 32}),
            world_size=4,
        )


def test_prefix_is_used_in_moe_keys():
    with raises_key("blocks.3.moe.num_experts", 6):
        validate_moe(MoEConfig(num_experts=6), ep=4, prefix="blocks.3.moe")


def test_world_not_divisible_by_ep():
    with raises_key("parallel.ep", 4) as e:
        validate_layout(world_size=6, ep=4, num_experts=8)
    assert "6" in str(e.value)
    with raises_key("parallel.ep", 4):
        validate(config(parallel={"ep": 4}, trainer={"global_batch_size": 48}), world_size=6)


def test_dense_model_needs_ep_1():
    assert validate_layout(world_size=4, ep=1, num_experts=0) is None
    with raises_key("parallel.ep", 2):
        validate_layout(world_size=4, ep=2, num_experts=0)


@pytest.mark.parametrize("top_k", [9, 100])
def test_top_k_above_num_experts(top_k):
    with raises_key("model.moe.top_k", top_k) as e:
        validate_moe(MoEConfig(num_experts=8, top_k=top_k))
    assert "model.moe.num_experts=8" in str(e.value)
    with raises_key("model.moe.top_k", top_k):
        validate(config(moe={"top_k": top_k}), world_size=1)


def test_top_k_equal_num_experts_is_fine():
    assert validate_moe(MoEConfig(num_experts=4, top_k=4)) is None


@pytest.mark.parametrize("cf", [0.0, -1.0, -0.5])
def test_capacity_factor_not_positive(cf):
    with raises_key("model.moe.capacity_factor", cf):
        validate_moe(MoEConfig(capacity_factor=cf))
    with raises_key("model.moe.capacity_factor", cf):
        validate(config(moe={"capacity_factor": cf}), world_size=1)


@pytest.mark.parametrize("cf", [None, 1e-3, 1.0, 2.5])
def test_capacity_factor_valid(cf):
    assert validate(config(moe={"capacity_factor": cf}), world_size=1) is None


@pytest.mark.parametrize(
    "world,global_bs,micro_bs", [(3, 16, 8), (2, 24, 8), (1, 10, 4), (2, 0, 8), (2, -16, 8)]
)
def test_global_batch_not_divisible(world, global_bs, micro_bs):
    cfg = config(trainer={"global_batch_size": global_bs, "micro_batch_size": micro_bs})
    with raises_key("trainer.global_batch_size", global_bs) as e:
        validate(cfg, world_size=world)
    assert f"{world} x {micro_bs}" in str(e.value)


@pytest.mark.parametrize("world,global_bs,micro_bs", [(3, 24, 8), (2, 48, 8), (4, 4, 1)])
def test_global_batch_divisible(world, global_bs, micro_bs):
    cfg = config(trainer={"global_batch_size": global_bs, "micro_batch_size": micro_bs})
    assert validate(cfg, world_size=world) is None


@pytest.mark.parametrize("router", ["topk", "Softmax", ""])
def test_unknown_router(router):
    with raises_key("model.moe.router", router):
        validate_moe(MoEConfig(router=router))
    with raises_key("model.moe.router", router):
        validate(config(moe={"router": router}), world_size=1)


def test_dim_not_divisible_by_heads():
    with raises_key("model.dim", 130) as e:
        validate(config(model={"dim": 130, "n_heads": 4}), world_size=1)
    assert "model.n_heads=4" in str(e.value)


def test_odd_head_dim():
    with raises_key("model.n_heads", 4):
        validate(config(model={"dim": 12, "n_heads": 4}), world_size=1)


@pytest.mark.parametrize("name", ["text", "tokens"])
@pytest.mark.parametrize("path", [None, ""])
def test_dataset_without_path(name, path):
    with raises_key("data.path", path) as e:
        validate(config(data={"name": name, "path": path}), world_size=1)
    assert f"data.name={name}" in str(e.value)
    assert validate(config(data={"name": name, "path": "x.bin"}), world_size=1) is None


def test_unknown_dataset_name():
    with raises_key("data.name", "wiki"):
        validate(config(data={"name": "wiki"}), world_size=1)


def test_ep_zero_is_a_value_error():
    with raises_key("parallel.ep", 0):
        validate(config(parallel={"ep": 0}), world_size=1)


def test_infinite_capacity_factor_is_a_value_error():
    with raises_key("model.moe.capacity_factor", math.inf):
        validate(config(moe={"capacity_factor": math.inf}), world_size=1)


ints = st.one_of(st.integers(-2, 2), st.integers(-4, 40))  # the first branch makes 0 and ±1 common
floats = st.floats(allow_nan=True, allow_infinity=True)


def names(valid):
    return st.one_of(st.sampled_from(valid), st.text(max_size=8))


FIELDS = {
    "model.moe.num_experts": ints,
    "model.moe.top_k": ints,
    "model.moe.expert_hidden": ints,
    "model.moe.capacity_factor": st.one_of(st.none(), floats),
    "model.moe.router": names(ROUTERS),
    "model.moe.norm_topk": st.booleans(),
    "model.moe.aux_loss_coef": floats,
    "model.moe.z_loss_coef": floats,
    "model.moe.num_shared_experts": ints,
    "model.moe.noisy_gate": st.booleans(),
    "model.moe.bias_update_rate": floats,
    "model.moe.every_n_layers": ints,
    "model.moe.grouped_mm": names(GROUPED_MM_MODES),
    "parallel.ep": ints.filter(lambda ep: ep != 0),
    "parallel.backend": names(BACKENDS),
    "parallel.timeout_s": floats,
    "trainer.max_steps": ints,
    "trainer.global_batch_size": ints,
    "trainer.micro_batch_size": ints,
    "trainer.lr": floats,
    "trainer.min_lr_ratio": floats,
    "trainer.warmup_steps": ints,
    "trainer.weight_decay": floats,
    "trainer.grad_clip": floats,
    "trainer.log_every": ints,
    "trainer.eval_every": ints,
    "trainer.eval_batches": ints,
    "trainer.ckpt_every": ints,
    "trainer.keep_checkpoints": ints,
    "trainer.device": names(("auto", "cpu", "cuda")),
    "trainer.precision": names(PRECISIONS),
    "trainer.accum_steps": st.one_of(st.none(), ints),
    "trainer.activation_checkpointing": names(("none", "full", "moe", "every_n:2", "every_n:0", "every_n:x")),
    "model.moe.aux_loss_scope": names(AUX_LOSS_SCOPES),
}


@st.composite
def valid_configs(draw):
    ep = draw(st.sampled_from([1, 2, 4]))
    num_experts = ep * draw(st.integers(1, 4))
    world = ep * draw(st.integers(1, 3))
    micro = draw(st.integers(1, 4))
    moe = {
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "capacity_factor": draw(st.one_of(st.none(), st.floats(0.01, 4.0))),
        "router": draw(st.sampled_from(ROUTERS)),
    }
    moe["norm_topk"] = moe["top_k"] > 1
    trainer = {"micro_batch_size": micro, "global_batch_size": world * micro * draw(st.integers(1, 3))}
    return config(moe=moe, parallel={"ep": ep}, trainer=trainer), world


def lookup(cfg, key):
    *path, last = key.split(".")
    for part in path:
        cfg = getattr(cfg, part)
    return cfg, last


@settings(max_examples=200, deadline=None)
@given(base=valid_configs(), data=st.data())
def test_validate_only_raises_value_error_naming_key_and_value(base, data):
    """Some fields of a valid config (none, a few, or all) get arbitrary values."""
    cfg, world = base
    corrupted = data.draw(st.sets(st.sampled_from(sorted(FIELDS))), label="corrupted")
    for key in sorted(corrupted):
        obj, attr = lookup(cfg, key)
        setattr(obj, attr, data.draw(FIELDS[key], label=key))
    try:
        result = validate(cfg, world_size=world)
    except ValueError as e:
        msg = str(e)
        assert "=" in msg
        key = msg.split("=", 1)[0]
        obj, attr = lookup(cfg, key)
        assert msg.startswith(f"{key}={getattr(obj, attr)!r}: "), msg
        assert corrupted, f"valid config rejected: {msg}"
    else:
        assert result is None


def in_(options):
    return lambda v: v in options


# What each field's comment in config.py promises, for fields whose validity does not depend on others.
ORACLE = {
    "model.moe.expert_hidden": lambda v: v >= 1,
    "model.moe.capacity_factor": lambda v: v is None or 0 < v < 1e6,
    "model.moe.router": in_(ROUTERS),
    "model.moe.aux_loss_coef": lambda v: v >= 0,
    "model.moe.z_loss_coef": lambda v: v >= 0,
    "model.moe.num_shared_experts": lambda v: v >= 0,
    "model.moe.noisy_gate": lambda v: True,
    "model.moe.bias_update_rate": lambda v: v >= 0,
    "model.moe.every_n_layers": lambda v: v >= 1,
    "model.moe.grouped_mm": in_(GROUPED_MM_MODES),
    "parallel.backend": in_(BACKENDS),
    "parallel.timeout_s": lambda v: v is None or v > 0,
    "trainer.max_steps": lambda v: v >= 1,
    "trainer.lr": lambda v: v > 0,
    "trainer.min_lr_ratio": lambda v: 0 <= v <= 1,
    "trainer.warmup_steps": lambda v: v >= 0,
    "trainer.weight_decay": lambda v: v >= 0,
    "trainer.grad_clip": lambda v: v >= 0,
    "trainer.log_every": lambda v: v >= 1,
    "trainer.eval_every": lambda v: v >= 0,
    "trainer.eval_batches": lambda v: v >= 1,
    "trainer.ckpt_every": lambda v: v >= 0,
    "trainer.keep_checkpoints": lambda v: v >= 1,
    "trainer.device": in_(("auto", "cpu", "cuda")),
    "trainer.precision": in_(PRECISIONS),
    "trainer.activation_checkpointing": lambda v: (
        v in ("none", "full", "moe") or (v.startswith("every_n:") and v[8:].isdigit() and int(v[8:]) >= 1)
    ),
    "model.moe.aux_loss_scope": in_(AUX_LOSS_SCOPES),
}


@pytest.mark.parametrize("key", sorted(ORACLE))
@settings(max_examples=25, deadline=None)
@given(base=valid_configs(), data=st.data())
def test_single_field_is_rejected_exactly_when_invalid(key, base, data):
    cfg, world = base
    value = data.draw(FIELDS[key], label=key)
    obj, attr = lookup(cfg, key)
    setattr(obj, attr, value)
    if ORACLE[key](value):
        assert validate(cfg, world_size=world) is None
    else:
        with raises_key(key, value):
            validate(cfg, world_size=world)


INT_EDGES = [-1, 0, 1, 2]
FLOAT_EDGES = [-1.0, -0.0, 0.0, 1e-9, 0.5, 1.0, 1.5, math.inf, -math.inf, math.nan]
STR_EDGES = {
    "model.moe.router": [*ROUTERS, "Softmax", ""],
    "model.moe.grouped_mm": [*GROUPED_MM_MODES, "true"],
    "parallel.backend": [*BACKENDS, "mpi"],
    "trainer.device": ["auto", "cpu", "cuda", "cuda:0", "mps"],
    "trainer.precision": [*PRECISIONS, "bfloat16", "FP32"],
    "trainer.activation_checkpointing": [
        "none",
        "full",
        "moe",
        "every_n:1",
        "every_n:3",
        "every_n:0",
        "every_n:",
        "every_n:-1",
        "every_2",
        "selective",
    ],
    "model.moe.aux_loss_scope": [*AUX_LOSS_SCOPES, "batch", ""],
}


def edge_cases():
    for key in sorted(ORACLE):
        default = getattr(*lookup(Config(), key))
        if key in STR_EDGES:
            values = STR_EDGES[key]
        elif isinstance(default, bool):
            values = [False, True]
        elif isinstance(default, int):
            values = INT_EDGES
        else:
            values = FLOAT_EDGES + ([None] if key == "model.moe.capacity_factor" else [])
        for v in values:
            yield pytest.param(key, v, id=f"{key}={v!r}")


@pytest.mark.parametrize("key,value", list(edge_cases()))
def test_single_field_edge_values(key, value):
    cfg = Config()
    obj, attr = lookup(cfg, key)
    setattr(obj, attr, value)
    if ORACLE[key](value):
        assert validate(cfg, world_size=2) is None
    else:
        with raises_key(key, value):
            validate(cfg, world_size=2)


@pytest.mark.parametrize(
    "world,trainer,layout",
    [
        (1, {"global_batch_size": 16, "micro_batch_size": 4}, (4, 4)),
        (4, {"global_batch_size": 16, "micro_batch_size": 4}, (4, 1)),
        (1, {"global_batch_size": 16, "accum_steps": 2}, (8, 2)),
        (4, {"global_batch_size": 16, "accum_steps": 2}, (2, 2)),
        (8, {"global_batch_size": 16, "accum_steps": 2, "micro_batch_size": 5}, (1, 2)),  # mbs is ignored
    ],
)
def test_batch_layout_keeps_accum_steps_when_set(world, trainer, layout):
    t = replace(TrainerConfig(), **trainer)
    validate(config(trainer=trainer), world_size=world)
    assert batch_layout(t, world_size=world) == layout


def test_accum_steps_a_world_size_cannot_keep_is_refused_with_the_numbers():
    cfg = config(trainer={"global_batch_size": 16, "accum_steps": 4})
    validate(cfg, world_size=4)
    with pytest.raises(
        ValueError, match=re.escape("trainer.accum_steps=4: cannot be kept at world size 8")
    ) as e:
        validate(cfg, world_size=8)
    assert "global_batch_size=16" in str(e.value) and "8 x 4" in str(e.value)


@pytest.mark.parametrize(
    "mode,parsed",
    [("none", ("none", 0)), ("full", ("every_n", 1)), ("moe", ("moe", 0)), ("every_n:3", ("every_n", 3))],
)
def test_activation_checkpointing_modes_parse(mode, parsed):
    assert parse_activation_checkpointing(mode) == parsed


def test_overlap_chunks_refuse_block_checkpointing():
    """The chunk pipeline's per-chunk backward would recompute a checkpointed block again (torch refuses):
    found by moe_dist.plan; experts-only checkpointing stays allowed."""
    for mode in ("full", "every_n:2"):
        with raises_key("trainer.activation_checkpointing", mode):
            validate(
                config(moe={"overlap_chunks": 2}, trainer={"activation_checkpointing": mode}), world_size=2
            )
    validate(config(moe={"overlap_chunks": 2}, trainer={"activation_checkpointing": "moe"}), world_size=2)
