"""DeepSpeed ZeRO stage 0/1/2 behind moe_dist's engine contract (see moe_dist/engines/base.py and docs/DEEPSPEED.md).

What DeepSpeed does here: it owns the gradient reduction (reduce-scatter into ZeRO partitions), the fp32 master
partitions and the AdamW state, partitioned over the world for dense parameters and over the EDP group for
expert parameters. What moe_dist keeps: the forward (the trainer calls the model directly), the expert
all-to-all, the process groups (DeepSpeed's expert registries are filled with moe_dist's own mesh groups), the
exact global gradient norm and the clipping, and the checkpoint format (fp32 masters and per-parameter Adam slots in
one global layout, written from each rank's ZeRO fragments without gathering them).

DeepSpeed internals relied on (pinned to deepspeed>=0.19,<0.20; each is checked by tests/test_deepspeed_engine.py):
- the engine decides ``has_moe_layers`` by ``isinstance(module, deepspeed.moe.layer.MoE)``: a parameter-free
  marker subclass sits beside the model in the module DeepSpeed wraps;
- expert parameters are recognised by ``param.allreduce is False`` and grouped by ``param.group_name``, whose
  groups come from ``deepspeed.utils.groups._EXPERT_{,DATA_}PARALLEL_GROUP{,_RANKS}`` under the name
  ``ep_size_<ep>``;
- expert gradients are summed over EDP and divided by the world size (ZeRO-1/2 reduce-scatter path and the
  stage-0 all-reduce path alike), which is moe_dist's convention: no correction factor is needed;
- ZeRO-1/2 and the BF16 optimizer link every parameter to its owned fragment of the flat partition
  (``param._hp_mapping``, ``param._index_in_param_group``): the same mapping that ``safe_get_full_grad`` and
  ``safe_get_full_optimizer_state`` use, read here for the local gradient fragments of the exact norm and, in
  checkpoints, for the owned fragments of the fp32 masters and AdamW slots (``get_hp_fragment(key)`` at
  ``lp_fragment_address``); after a load the optimizer's ``update_lp_params()`` refreshes the model weights;
- the basic (client) optimizer's ``step()`` receives the reduced, partitioned fp32 gradients as ``.grad`` of
  its parameters: the clip factor is applied there.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.config import EngineConfig, TrainerConfig, batch_layout
from moe_dist.engines.base import live_state, zero_adam_state
from moe_dist.moe.experts import GroupedExperts
from moe_dist.optim import build_optimizer
from moe_dist.parallel.apply import global_grad_norm, split_parameters
from moe_dist.parallel.layout import Fragments, GlobalTensor, flat_fragment
from moe_dist.parallel.mesh import Mesh

TESTED_DEEPSPEED = "0.19."
# DeepSpeed keys that moe_dist derives from its own config; setting them in engine.deepspeed is an error.
DERIVED_KEYS = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size / (world size x trainer.micro_batch_size)",
    "gradient_clipping": "trainer.grad_clip (moe_dist clips on the exact global norm itself)",
    "optimizer": "trainer.lr / betas / weight_decay (the AdamW of moe_dist.optim is passed to DeepSpeed)",
    "scheduler": "trainer.lr / warmup_steps / min_lr_ratio (the trainer sets the lr every step)",
}


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW whose ``step`` first multiplies the gradients it is handed by ``clip_coef``, or does nothing
    when ``skip`` is set.

    DeepSpeed calls it with the reduced gradients already in place (ZeRO-1/2: the fp32 partitions, once per
    partitioned group), so scaling here applies one clip factor to every gradient element exactly once.
    """

    def __init__(self, param_groups: list[dict[str, Any]]):
        super().__init__(param_groups)
        self.clip_coef = 1.0
        self.skip = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        if self.clip_coef != 1.0:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, self.clip_coef)
        return super().step(closure)


def import_deepspeed(device: torch.device) -> ModuleType:
    """Imports DeepSpeed with the accelerator of ``device`` (DeepSpeed picks it once, at import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if not deepspeed.__version__.startswith(TESTED_DEEPSPEED):
        warnings.warn(
            f"moe_dist's DeepSpeed engine is tested with deepspeed {TESTED_DEEPSPEED}x, found "
            f"{deepspeed.__version__}; docs/DEEPSPEED.md lists the internals it relies on",
            stacklevel=2,
        )
    # DeepSpeed logs its whole config and every group at INFO; engine.deepspeed.log_level=info brings it back.
    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_config(engine: EngineConfig, trainer: TrainerConfig, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: moe_dist's batch layout and ZeRO stage, then the pass-through keys merged in."""
    extra = copy.deepcopy(dict(engine.deepspeed or {}))
    for key, source in DERIVED_KEYS.items():
        if key in extra:
            raise ValueError(
                f"engine.deepspeed.{key}={extra[key]!r}: set by moe_dist from {source}; remove it"
            )
    if _section(extra, "fp16").get("enabled", False):
        raise ValueError(
            "engine.deepspeed.fp16: fp16 with loss scaling is not supported by this engine; use bf16 or fp32"
        )
    zero = _section(extra, "zero_optimization")
    if "stage" in zero and zero["stage"] != engine.zero_stage:
        raise ValueError(
            f"engine.deepspeed.zero_optimization.stage={zero['stage']!r}: the stage is engine.zero_stage="
            f"{engine.zero_stage}; remove it from engine.deepspeed"
        )
    for key in ("offload_optimizer", "offload_param"):
        if _section(zero, key).get("device", "none") not in ("none", None):
            raise ValueError(
                f"engine.deepspeed.zero_optimization.{key}: ZeRO-Offload is not supported by this engine"
            )
    if _section(extra, "bf16").get("enabled", False) and engine.zero_stage == 0:
        raise ValueError(
            "engine.deepspeed.bf16: needs engine.zero_stage=1 or 2 (DeepSpeed's stage-0 bf16 optimizer keeps "
            "no per-parameter fp32 fragments to read slots and gradients from)"
        )
    micro_batch_size, accum = batch_layout(trainer, world_size=world_size)
    config: dict[str, Any] = {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": engine.zero_stage},
        # The client optimizer is torch AdamW with a pre-step gradient scale (ClippedAdamW): same math.
        "zero_allow_untested_optimizer": True,
    }
    _merge(config, extra)
    return config


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one rank; moe_dist creates none for a world of 1."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # DeepSpeed asserts LOCAL_RANK is set (torchrun sets it; a world of 1 may be started without it).
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))


def register_expert_groups(mesh: Mesh) -> str:
    """Makes moe_dist's EP and EDP groups DeepSpeed's only expert groups; returns their DeepSpeed name."""
    from deepspeed.utils import groups

    name = f"ep_size_{mesh.ep}"  # DeepSpeed parses the EP size out of this name (groups._get_max_expert_size)
    if mesh.device_mesh is not None:
        ep_group, edp_group = mesh.device_mesh.get_group("ep"), mesh.device_mesh.get_group("edp")
    else:  # a world of 1: both groups are the one-rank world
        ep_group = edp_group = dist.group.WORLD
    ep_ranks = mesh.ep_ranks
    edp_ranks = [i * mesh.ep + mesh.ep_rank for i in range(mesh.edp)]
    assert dist.get_process_group_ranks(ep_group) == ep_ranks, (ep_ranks, ep_group)
    assert dist.get_process_group_ranks(edp_group) == edp_ranks, (edp_ranks, edp_group)
    registries = (
        (groups._EXPERT_PARALLEL_GROUP, ep_group),
        (groups._EXPERT_PARALLEL_GROUP_RANKS, ep_ranks),
        (groups._EXPERT_DATA_PARALLEL_GROUP, edp_group),
        (groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, edp_ranks),
    )
    for registry, value in registries:
        registry.clear()  # groups of an earlier engine in this process (tests run several) are stale
        registry[name] = value
    return name


def _moe_marker(*, num_experts: int, ep: int, group_name: str) -> nn.Module:
    """A parameter-free ``deepspeed.moe.layer.MoE`` instance: DeepSpeed's engine turns on its MoE handling
    (expert groups in ZeRO, EDP gradient reduction) only when it finds one in the module tree."""

    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no groups of DeepSpeed's own
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep, group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are moe_dist's, registered by register_expert_groups."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-parallel marker has no forward")

    return ExpertParallelMarker()


class _Wrapped(nn.Module):
    """What DeepSpeed wraps: the model (same parameter objects) and, for MoE models, the marker."""

    def __init__(self, model: nn.Module, marker: nn.Module | None):
        super().__init__()
        self.model = model
        if marker is not None:
            self.expert_parallel = marker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _owned_grad_fragment(p: nn.Parameter) -> torch.Tensor | None:
    """This rank's fragment of ``p``'s reduced gradient under ZeRO-1/2 or the BF16 optimizer (None: not owned).

    Mirrors ``deepspeed.utils.tensor_fragment.get_full_hp_grad`` without its all-reduce: the BF16 optimizer
    keeps a full-size gradient per parameter, of which only the owned slice may be counted.
    """
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
    if grad.numel() == p.numel():
        address = mapping.lp_fragment_address
        grad = grad.narrow(0, address.start, address.numel)
    return grad


class DeepSpeedEngine:
    """ZeRO stage 0/1/2 over moe_dist's edp x ep mesh, with native's AdamW, gradient scale and exact clipping."""

    def __init__(self, model: nn.Module, *, engine: EngineConfig, trainer: TrainerConfig, mesh: Mesh):
        device = next(model.parameters()).device
        self.model, self.mesh, self.device = model, mesh, device
        config = deepspeed_config(engine, trainer, world_size=mesh.world_size)
        deepspeed = import_deepspeed(device)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.runtime.base_optimizer import ZeROOptimizer  # ZeRO-1/2 and the BF16 optimizer

        _ensure_process_group(device)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

        _, experts = split_parameters(model)
        marker = None
        if experts:
            group_name = register_expert_groups(mesh)
            for p in experts:
                p.allreduce, p.group_name = False, group_name
            num_experts = next(m.num_global_experts for m in model.modules() if isinstance(m, GroupedExperts))
            marker = _moe_marker(num_experts=num_experts, ep=mesh.ep, group_name=group_name)

        # The very groups and hyper-parameters of the native engine (decay on >= 2-D parameters), expert
        # parameters then moved into DeepSpeed's per-expert-group param groups.
        native = build_optimizer(model, trainer)
        param_groups = [
            {**group, "name": f"group_{i}", "params": list(group["params"])}
            for i, group in enumerate(native.param_groups)
            if group["params"]
        ]
        if experts:
            param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
        self.adam = ClippedAdamW(param_groups)
        self._zero_optimizer_cls = ZeROOptimizer
        self.ds, _, _, _ = deepspeed.initialize(
            model=_Wrapped(model, marker), optimizer=self.adam, config=config
        )
        assert self.ds.has_moe_layers == bool(experts), "DeepSpeed did not pick up the expert parameters"
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.partitioned = any(hasattr(p, "_hp_mapping") for _, p in self.params)
        self._init_adam_state()
        self._step_pending = False

    def _init_adam_state(self) -> None:
        """Creates AdamW's slots now, as torch would at its first step, so that ``checkpoint_state`` has tensors
        to fill before any step and DeepSpeed links each parameter to its fragment of them."""
        for group in self.adam.param_groups:
            for p in group["params"]:
                state = self.adam.state[p]
                if not state:
                    state.update(zero_adam_state(p))
        link = getattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last_micro_batch)
        if isinstance(self.ds.optimizer, self._zero_optimizer_cls):
            # The trainer calls the model, not DeepSpeed's engine.forward, so two things that engine.forward
            # (and the backward hook it puts on its output) do per micro-batch happen here: reset ZeRO's
            # backward-hook bookkeeping, and the optimizer's backward prologue (the BF16 optimizer clears
            # the bf16 gradients it has already accumulated into fp32; without it they count twice).
            self.ds.optimizer.clear_backward_seen_flag()
            self.ds.optimizer.backward_prologue()
        # The loss already carries 1/accumulation; DeepSpeed must not divide again.
        self.ds.backward(loss, scale_wrt_gas=False)

    @torch.no_grad()
    def reduce_gradients(self) -> torch.Tensor:
        """DeepSpeed reduced the gradients in the last backward; this returns their exact global L2 norm.

        ZeRO-1/2: each rank holds the fragments it owns: every dense element is owned by one rank of the world,
        every element of an expert shard by one rank of its EDP group, and EP ranks hold different shards, so
        one world sum of the owned squares counts everything once. Stage 0: full gradients, as in native.
        """
        self._step_pending = True
        if not self.partitioned:
            return global_grad_norm(self.model, self.mesh)
        fragments = [f.float() for _, p in self.params if (f := _owned_grad_fragment(p)) is not None]
        if fragments:
            total = torch.stack(torch._foreach_norm(fragments)).square().sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.mesh.world_group is not None:
            dist.all_reduce(total, group=self.mesh.world_group)
        return total.sqrt()

    def step(self, grad_norm: torch.Tensor, *, max_norm: float) -> None:
        scale = 1.0
        if (
            max_norm > 0
        ):  # native's factor (clip_gradients_); .item() costs nothing: the trainer synced already
            scale = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0).item()
        self.adam.clip_coef = scale
        self.ds.step()
        self.adam.clip_coef, self._step_pending = 1.0, False

    def zero_grad(self) -> None:
        if self._step_pending:
            # The trainer skipped the step (non-finite gradients). DeepSpeed clears its reduced partitions and
            # accumulation state only in its step, so run that with the AdamW update switched off.
            self.adam.skip = True
            try:
                self.ds.step()
            finally:
                self.adam.skip, self._step_pending = False, False
        self.ds.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.adam.param_groups:
            group["lr"] = lr

    def _step_count(self) -> torch.Tensor:
        steps = {float(s["step"]) for s in self.adam.state.values()}
        assert len(steps) == 1, f"AdamW groups disagree on the step count: {steps}"
        return torch.tensor(steps.pop(), dtype=torch.float32)

    def checkpoint_state(self) -> dict[str, GlobalTensor]:
        """ZeRO-1/2: this rank's fragments of the fp32 master weights and of the AdamW slots (in bf16 mode too:
        the masters, never the bf16 weights), as boxes of the global tensors. ``param._hp_mapping`` gives each
        parameter's owned range of its flattened elements, views of DeepSpeed's flat fp32 partitions; nothing
        is gathered or copied. Stage 0: the live tensors, as the native engine."""
        if not self.partitioned:
            return live_state(self.model, self.adam, mesh=self.mesh)
        experts = {id(p) for p in split_parameters(self.model)[1]}
        step = self._step_count()
        state: dict[str, GlobalTensor] = {}
        for name, p in self.params:
            local_shape = tuple(p.shape)
            global_shape, dim0_offset = local_shape, 0
            if id(p) in experts:  # the local shard is rows [ep_rank·L, (ep_rank+1)·L) of the global experts
                global_shape = (local_shape[0] * self.mesh.ep, *local_shape[1:])
                dim0_offset = self.mesh.ep_rank * local_shape[0]
            mapping = p._hp_mapping  # None: no element of p falls in this rank's partition
            for key, slot in (("model", None), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                fqn = f"model.{name}" if slot is None else f"optim.{name}.{key}"
                if mapping is None:
                    state[fqn] = Fragments(global_shape=global_shape, dtype=torch.float32)
                    continue
                state[fqn] = flat_fragment(
                    mapping.get_hp_fragment(slot),
                    local_shape=local_shape,
                    start=mapping.lp_fragment_address.start,
                    global_shape=global_shape,
                    dim0_offset=dim0_offset,
                )
            state[f"optim.{name}.step"] = step.clone()
        return state

    @torch.no_grad()
    def after_checkpoint_load(self, state: dict[str, GlobalTensor]) -> None:
        """ZeRO-1/2: the load filled the master and slot fragments in place; the step counts come from the
        checkpoint, and the model's (bf16 or fp32) weights from the masters, by DeepSpeed's own copy and
        all-gather over each partition group (``update_lp_params``, as after every step)."""
        if not self.partitioned:
            return  # checkpoint_state returned the live tensors, which the load filled in place
        steps = {float(state[f"optim.{name}.step"]) for name, _ in self.params}
        if len(steps) != 1:
            raise ValueError(f"checkpoint: AdamW step counts differ between parameters ({sorted(steps)})")
        step = steps.pop()
        for slots in self.adam.state.values():
            slots["step"].fill_(step)
        self.ds.optimizer.update_lp_params()
