"""The two MoE layers bench_moe.py compares, built from the same router and expert weights: moe_dist's
MoELayer and deepspeed.moe.layer.MoE with SwiGLU experts laid out like a moe_dist expert shard.

Legend: T tokens per rank, D model dim, F expert hidden dim, E experts, K experts per token,
P expert-parallel ranks, L = E / P local experts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from bench_common import Runtime
from torch import nn

from moe_dist import MoEConfig, MoELayer, parallelize_moe, sync_gradients

SEED = 1234
AUX_LOSS_COEF = 0.01
ZIPF_EXPONENT = 1.0


@dataclass(frozen=True)
class Case:
    """One layer configuration; ``name`` starts with the config letter (A, B, C, D)."""

    name: str
    dim: int
    hidden: int
    num_experts: int
    top_k: int
    tokens: int  # per rank
    capacity_factor: float | None  # None: dropless (DeepSpeed drop_tokens=False)
    routing: str  # "uniform-ish" (random router) or "zipf"
    grad_sync: bool = False  # include each implementation's gradient all-reduce (EP x DP config D)
    chunks_variant: int = 0  # > 1: also time moe_dist with model.moe.overlap_chunks = this

    @property
    def letter(self) -> str:
        return self.name[0]

    def flops_per_copy(self) -> int:
        """fwd+bwd FLOPs of one routed token copy through a SwiGLU expert: 3 x (2·D·2F + 2·F·D)."""
        return 3 * (2 * self.dim * 2 * self.hidden + 2 * self.hidden * self.dim)


def load_deepspeed(rt: Runtime) -> ModuleType:
    """Imports DeepSpeed (its accelerator is chosen at import time) and attaches it to our process group."""
    if not rt.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses the initialised default group
    return deepspeed


class SwiGLUExpert(nn.Module):
    """One SwiGLU expert for DeepSpeed's MoE, laid out like a moe_dist expert shard: w_gate_up [D, 2F], w_down [F, D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.zeros(dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.zeros(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w_gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down


def zipf_router_bias(weight_ED: torch.Tensor, *, top_k: int, ep: int) -> torch.Tensor:
    """Per-expert logit bias that makes top-k expert popularity follow Zipf(ZIPF_EXPONENT).

    Neither router has a bias, so the inputs carry a constant 1 in feature 0 and the bias goes into router
    weight column 0. Popularity ranks are dealt round-robin over the EP ranks (rank r → EP rank r mod P),
    so that the skew is between experts and not mostly between ranks. Calibrated on a fixed sample.
    """
    E, D = weight_ED.shape
    L = E // ep
    rank_of_expert = torch.empty(E)
    for r in range(E):
        rank_of_expert[(r % ep) * L + r // ep] = r
    target_E = (rank_of_expert + 1) ** -ZIPF_EXPONENT
    target_E = target_E / target_E.sum()
    gen = torch.Generator().manual_seed(SEED + 7)
    x_ND = torch.randn(16384, D, generator=gen)
    base_NE = x_ND[:, 1:] @ weight_ED.detach().float().cpu()[:, 1:].t()
    bias_E = torch.zeros(E)
    for _ in range(200):
        ids = (base_NE + bias_E).topk(top_k, dim=-1).indices
        share_E = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
        bias_E += 0.1 * (target_E.log() - share_E.clamp_min(1e-6).log())
        bias_E -= bias_E.mean()
    return bias_E


def build_moe_dist(
    case: Case, rt: Runtime, *, grouped_mm: str, bias_E: torch.Tensor | None, overlap_chunks: int = 1
) -> MoELayer:
    torch.manual_seed(SEED)  # the same global weights on every rank, then each keeps its shard
    cfg = MoEConfig(
        num_experts=case.num_experts,
        top_k=case.top_k,
        expert_hidden=case.hidden,
        capacity_factor=case.capacity_factor,
        aux_loss_coef=AUX_LOSS_COEF,
        z_loss_coef=0.0,  # DeepSpeed's gate has no z-loss
        grouped_mm=grouped_mm,
        overlap_chunks=overlap_chunks,
    )
    layer = MoELayer(case.dim, cfg)
    parallelize_moe(layer, rt.mesh)
    layer = layer.to(rt.device)
    if bias_E is not None:
        with torch.no_grad():
            layer.router.weight[:, 0] = bias_E
    return layer


def build_deepspeed(case: Case, rt: Runtime, ref: MoELayer) -> nn.Module:
    """DeepSpeed's MoE with moe_dist's settings and a copy of ``ref``'s router and local expert weights."""
    from deepspeed.moe.layer import MoE

    cf = case.capacity_factor
    moe = MoE(
        hidden_size=case.dim,
        expert=SwiGLUExpert(case.dim, case.hidden),
        num_experts=case.num_experts,
        ep_size=rt.mesh.ep,
        k=case.top_k,
        capacity_factor=cf or 1.0,
        eval_capacity_factor=cf or 1.0,
        min_capacity=0,  # moe_dist has no minimum: capacity = ceil(cf·T·K/E) in both
        noisy_gate_policy=None,
        drop_tokens=cf is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,  # the second expert is the arg-max, as in moe_dist
    )
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ref.router.weight)
        experts = moe.deepspeed_moe.experts.deepspeed_experts
        assert len(experts) == ref.experts.num_local_experts
        for i, expert in enumerate(experts):
            expert.w_gate_up.copy_(ref.experts.w_gate_up[i])
            expert.w_down.copy_(ref.experts.w_down[i])
    return moe.to(rt.device)


def _all_reduce_mean(params: list[nn.Parameter], group: Any, divisor: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divisor
    for p, synced in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = synced.view_as(p)


def deepspeed_grad_sync(moe: nn.Module, rt: Runtime) -> None:
    """What DeepSpeed's engine does for an MoE layer: expert grads over the expert-data-parallel group,
    the gate over the world (one flat all-reduce each, as moe_dist's sync_gradients)."""
    from deepspeed.utils import groups

    expert_params = list(moe.deepspeed_moe.experts.parameters())
    edp_group = groups._get_expert_data_parallel_group(moe.expert_group_name)
    if dist.get_world_size(edp_group) > 1:
        _all_reduce_mean(expert_params, edp_group, rt.world)
    _all_reduce_mean(list(moe.deepspeed_moe.gate.parameters()), None, rt.world)


def make_step(
    rt: Runtime, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, *, grad_sync: bool
) -> Callable[[], torch.Tensor]:
    """One fwd+bwd of ``layer``; returns its output."""
    is_moe_dist = isinstance(layer, MoELayer)

    def step() -> torch.Tensor:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with rt.autocast():
            if is_moe_dist:
                y = layer(x)
                aux = layer.stats.aux_loss
            else:
                y, aux, _ = layer(x)
            loss = (y.float() * g).sum() + AUX_LOSS_COEF * aux
        loss.backward()
        if grad_sync:
            if is_moe_dist:
                sync_gradients(layer, rt.mesh)
            else:
                deepspeed_grad_sync(layer, rt)
        return y

    return step


@dataclass
class Impl:
    name: str
    layer: nn.Module
    step: Callable[[], torch.Tensor]
    kept_copies: float = 0.0  # routed copies processed by experts, summed over ranks
    extra: dict[str, Any] = field(default_factory=dict)


def count_kept(rt: Runtime, impl: Impl, x: torch.Tensor) -> None:
    """Kept (not dropped) routed copies over all ranks; for DeepSpeed also its expert buffer capacity."""
    with torch.no_grad(), rt.autocast():
        if isinstance(impl.layer, MoELayer):
            impl.layer(x)
            st = impl.layer.stats
            impl.kept_copies = rt.rank_sum(st.num_copies - st.num_dropped)
            counts_E = st.counts_E.double()
        else:
            gate_out = impl.layer.deepspeed_moe.gate(x, None, True)
            capacity, indices_KT, counts_E = int(gate_out[1]), gate_out[3], gate_out[6].double()
            impl.kept_copies = rt.rank_sum(float((indices_KT >= 0).sum()))
            # Every local expert runs on P·capacity rows (padding included).
            impl.extra["capacity"] = capacity
            impl.extra["expert_rows_per_rank"] = (
                capacity * rt.mesh.ep * (impl.layer.num_experts // rt.mesh.ep)
            )
    dist.all_reduce(counts_E)
    impl.extra["max_over_mean_expert_load"] = (counts_E.max() / counts_E.mean()).item()
