"""The MoE layer: route → dispatch → grouped experts → combine (+ shared experts).

Legend: T tokens on this rank, D model dim, K experts per token, E global experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import MoEConfig, validate_moe
from moe_dist.moe.dispatch import TokenDispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.router import Router, Routing


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (the dense FFN, and the shared experts concatenated along the hidden dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


@dataclass
class MoEStats:
    """What one forward of the layer reports (the losses carry gradients)."""

    aux_loss: torch.Tensor  # this rank's share of the global load-balancing loss (unweighted)
    z_loss: torch.Tensor  # this rank's share of the global router z-loss (unweighted)
    counts_E: torch.Tensor  # routed copies per global expert on this rank (before drops)
    num_dropped: int  # copies dropped by capacity on this rank
    num_copies: int  # T·K routed copies on this rank
    exchange_rounds: int = 1  # > 1 when the receive budget split the exchange into rounds
    received_rows: int | None = None  # peak rows this rank received in one round (None when ep == 1)

    def weighted_loss(self, cfg: MoEConfig) -> torch.Tensor:
        return cfg.aux_loss_coef * self.aux_loss + cfg.z_loss_coef * self.z_loss


class MoELayer(nn.Module):
    """Expert-parallel MoE feed-forward layer, usable as a drop-in module in any model.

    Built as a single-device module holding all E experts; ``moe_dist.parallelize_moe(model, mesh)`` shards
    the experts over the mesh's EP group afterwards. Input [..., D] → output [..., D] in the input dtype.
    After each forward, ``layer.stats`` holds the losses and counts of that forward.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        validate_moe(cfg, dim=dim)
        assert cfg.num_experts > 0, "an MoE layer needs num_experts > 0"
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden, grouped_mm=cfg.grouped_mm)
        shared_hidden = cfg.num_shared_experts * cfg.expert_hidden
        self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        self.dispatcher = TokenDispatcher(cfg.num_experts, recv_budget=cfg.recv_budget)
        self.stats: MoEStats | None = None

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity on this rank (GShard / Switch convention), None when dropless."""
        if self.cfg.capacity_factor is None:
            return None
        # Exact decimal arithmetic: 1.1 * 25 * 2 / 5 is 11.000000000000002 in floats, and must give 11.
        factor = Fraction(repr(self.cfg.capacity_factor))
        return math.ceil(factor * num_tokens * self.router.top_k / self.cfg.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        # [..., S, D]: sequences of S tokens (the sequence aux-loss scope); a 2-D input is one sequence.
        routing = self.router(x_TD, seq_len=x.shape[-2] if x.dim() >= 3 else None)
        y_TD = self.routed_experts(x_TD, routing)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)
        return y_TD.to(x.dtype).view(x.shape)

    @torch.compiler.disable
    def routed_experts(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dispatch → experts → combine, and the layer's stats. Always eager: under torch.compile the graph
        breaks around it (its one host sync and its data-dependent row counts stay out of the graphs)."""
        x_rows_TD = x_TD
        if torch.is_autocast_enabled(x_TD.device.type):  # rows cross the all-to-all in bf16, not fp32
            x_rows_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        y_TD, plan, rounds = self.dispatcher.forward(
            x_rows_TD,
            routing.expert_ids_TK,
            routing.weights_TK,
            routing.counts_E,
            capacity=self.capacity(len(x_TD)),
            experts=self.experts,
        )
        aux_loss, z_loss = routing.aux_loss, routing.z_loss
        if torch._C._current_graph_task_id() != -1:
            # Inside backward: activation checkpointing recomputing this layer. Its losses were taken in the
            # first forward; kept with their graph, they would hold every recomputed block's tensors until the
            # step's end (8-layer CPU model, full checkpointing: step peak 49.6 MiB with, 13.9 without).
            aux_loss, z_loss = aux_loss.detach(), z_loss.detach()
        self.stats = MoEStats(
            aux_loss=aux_loss,
            z_loss=z_loss,
            counts_E=routing.counts_E,
            num_dropped=plan.num_dropped or 0,
            num_copies=routing.expert_ids_TK.numel(),
            exchange_rounds=rounds,
            received_rows=self.dispatcher.received_rows_per_round(plan, rounds),
        )
        return y_TD
