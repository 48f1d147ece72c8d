"""A training step makes the host wait for the device once per MoE layer forward, plus once for the step.

On CUDA the host waits whenever it reads device data (``.item()``, ``.tolist()``, ``.cpu()``), copies from
pageable host memory to the device (``torch.tensor(..., device=)``, ``new_tensor``, a blocking ``.to()``),
or runs an op whose output size comes from data (``nonzero``, boolean indexing, ``repeat_interleave``
without ``output_size``, ...). This machine has no GPU, so the test counts those *call sites* while a real
step runs on CPU: a dispatch mode sees every op, and the Python-level calls are wrapped. Allowed: the one
counts exchange of each MoE layer forward (its split sizes) and the step's non-finite check. Not counted:
the data phase (host work on the host-resident token stream; its batches reach the device through
``moe_dist.transfer.to_device``, pinned and non-blocking), and AdamW's step counters, which torch keeps on
the host (non-capturable AdamW).
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from harness import spawn_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from training_runs import TINY, compose_config

from moe_dist.trainer import build_run, train_step

aten = torch.ops.aten
PACKAGE = str(Path(__file__).resolve().parent.parent / "moe_dist")
# CUDA kernels whose result the host must wait for: a scalar read, or an output size taken from the data.
SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.equal.default,
    aten.is_nonzero.default,
}


def syncs_on_cuda(func, args, kwargs) -> bool:
    if func in SYNCING_OPS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return False


def call_site() -> str:
    """The innermost moe_dist line on the stack, for the failure message."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(PACKAGE):
            return f"{Path(frame.filename).relative_to(Path(PACKAGE).parent)}:{frame.lineno} {frame.line}"
    return "outside moe_dist"


class HostSyncs(TorchDispatchMode):
    """Records (phase, what, where) for each call site that would block the host on CUDA."""

    def __init__(self, host_scalars: set[int]):
        super().__init__()
        self.host_scalars = host_scalars  # data pointers of host-resident scalars (AdamW step counters)
        self.events: list[tuple[str, str, str]] = []
        self.phase = "data"

    def note(self, what: str) -> None:
        if self.phase != "data":
            self.events.append((self.phase, what, call_site()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        host_scalar = func is aten._local_scalar_dense.default and args[0].data_ptr() in self.host_scalars
        if syncs_on_cuda(func, args, kwargs) and not host_scalar:
            self.note(str(func))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def python_calls(self):
        """Wraps the Python-level calls that read device data or copy to the device blocking."""

        def has_device(args, kwargs) -> bool:  # .to(device) / .to("cuda") / .to(device=...), not .to(dtype)
            return any(isinstance(v, (torch.device, str)) for v in (*args, kwargs.get("device")))

        checks = {
            (torch.Tensor, "tolist"): lambda *a, **k: True,
            (torch.Tensor, "cpu"): lambda *a, **k: True,
            (torch.Tensor, "numpy"): lambda *a, **k: True,
            (torch.Tensor, "cuda"): lambda *a, **k: True,
            (torch.Tensor, "new_tensor"): lambda *a, **k: True,
            (torch.Tensor, "to"): lambda self, *a, **k: has_device(a, k) and not k.get("non_blocking", False),
            (torch, "tensor"): lambda *a, **k: k.get("device") is not None,
        }
        originals = {key: getattr(*key) for key in checks}

        def wrapped(key, original):
            def call(*args, **kwargs):
                if checks[key](*args, **kwargs):
                    self.note(key[1])
                return original(*args, **kwargs)

            return call

        for key, original in originals.items():
            setattr(*key, wrapped(key, original))
        try:
            yield
        finally:
            for key, original in originals.items():
                setattr(*key, original)


def count_step_syncs(overrides: list[str]) -> dict:
    cfg = compose_config([*TINY, "trainer.max_steps=3", "trainer.micro_batch_size=2", *overrides])
    run = build_run(cfg)
    train_step(run, 1)  # creates AdamW's state
    adam_steps = {s["step"].data_ptr() for s in run.engine.optimizer.state.values()}
    counter = HostSyncs(adam_steps)

    @contextlib.contextmanager
    def phase(name: str):
        counter.phase = name
        yield

    with counter, counter.python_calls():
        result = train_step(run, 2, phase=phase)
    assert result.skip_message is None
    return {
        "events": counter.events,
        "moe_layer_forwards": sum(1 for _ in run.model.moe_layers()) * run.accum_steps,
        "rounds": run.stats.exchange_rounds,
    }


def check(counted: dict, *, several_rounds: bool = False) -> None:
    events, allowed = counted["events"], counted["moe_layer_forwards"] + 1
    listing = "\n".join(f"  {phase}: {what} at {where}" for phase, what, where in events)
    assert len(events) <= allowed, f"{len(events)} host syncs, at most {allowed} allowed:\n{listing}"
    # Exactly: one counts read per MoE layer forward, one non-finite check.
    assert [e[:2] for e in events].count(("nonfinite_check", "aten._local_scalar_dense.default")) == 1, (
        listing
    )
    assert sum(phase == "forward" for phase, _, _ in events) == counted["moe_layer_forwards"], listing
    assert (counted["rounds"] > 1) == several_rounds  # the budget case does split the exchange


WORLD1 = {
    "dropless": [],
    "capacity": ["model.moe.capacity_factor=1.0"],
}
WORLD2 = {
    "ep2_dropless": ["parallel.ep=2"],
    "ep2_capacity_budget": ["parallel.ep=2", "model.moe.capacity_factor=1.5", "model.moe.recv_budget=40"],
    "ep2_overlap_chunks": ["parallel.ep=2", "model.moe.overlap_chunks=2"],
}


@pytest.mark.parametrize("name", list(WORLD1))
def test_one_host_sync_per_moe_layer_world1(name, tmp_path, one_thread):
    check(count_step_syncs([*WORLD1[name], f"trainer.out_dir={tmp_path}"]))


def world2_counts(rank: int, world_size: int, root: str) -> dict:
    return {name: count_step_syncs([*o, f"trainer.out_dir={root}/{name}"]) for name, o in WORLD2.items()}


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict:
    return spawn_ranks(2, world2_counts, str(tmp_path_factory.mktemp("syncs")))


@pytest.mark.parametrize("name", list(WORLD2))
def test_one_host_sync_per_moe_layer_world2(name, world2):
    for rank_counts in world2:
        check(rank_counts[name], several_rounds="budget" in name)
