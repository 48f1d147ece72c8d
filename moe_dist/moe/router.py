"""Token-choice top-k routers, the load-balancing and z losses, and the aux-loss-free bias.

Legend: T tokens on this rank, D model dim, E routed experts (global), K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_dist.config import MoEConfig


@torch.compiler.disable
def _all_reduce_sum(t: torch.Tensor, *, group: dist.ProcessGroup) -> None:
    """In place, eagerly (under torch.compile the graph breaks here: the collective stays out of the graph)."""
    dist.all_reduce(t, group=group)


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # int64, global expert ids
    weights_TK: torch.Tensor  # fp32 gate weights (differentiable)
    counts_E: torch.Tensor  # int64 token copies per expert on this rank (before capacity drops)
    aux_loss: torch.Tensor  # fp32 scalar, this rank's share (see Router.forward)
    z_loss: torch.Tensor  # fp32 scalar, this rank's share


class Router(nn.Module):
    """Scores tokens against E experts and picks K per token.

    ``softmax``: probabilities over all experts (GShard / Switch / Mixtral); with ``norm_topk`` the K chosen
    weights are renormalised, which equals a softmax over the K chosen logits (Mixtral).
    ``sigmoid``: independent affinities (DeepSeek-V3); a per-expert bias that is not a parameter shifts the
    *selection* only, and is moved after each step from global expert counts (aux-loss-free balancing).
    ``soft``: the dense soft mixture of Jacobs et al. (1991): every expert, weighted by
    softmax(logits / temperature); ``top_k`` is ignored (K = E).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts if cfg.router == "soft" else cfg.top_k
        self.temperature = cfg.temperature
        self.score_fn, self.norm_topk = cfg.router, cfg.norm_topk
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.bias_update_rate = cfg.bias_update_rate
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        self.noise_weight = nn.Parameter(torch.empty(cfg.num_experts, dim)) if cfg.noisy_gate else None
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # Set by parallelize_moe: the ranks that see different tokens and average dense gradients.
        self.dp_group: dist.ProcessGroup | None = None
        self.dp_size = 1
        nn.init.normal_(self.weight, std=0.02)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.noise_weight is not None and self.training:
            noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        if self.score_fn == "soft":
            scores_TE = (logits_TE / self.temperature).softmax(dim=-1)
            expert_ids_TK = torch.arange(self.num_experts, device=x_TD.device).expand_as(scores_TE)
            weights_TK = scores_TE
        else:
            if self.score_fn == "softmax":
                scores_TE = logits_TE.softmax(dim=-1)
                select_TE = scores_TE
            else:
                scores_TE = logits_TE.sigmoid()
                select_TE = scores_TE + self.expert_bias
            expert_ids_TK = select_TE.topk(self.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(-1, expert_ids_TK)
        if self.norm_topk and self.score_fn != "soft":
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        T, E = logits_TE.shape
        counts_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK.reshape(-1)))
        aux_loss, z_loss = self._losses(logits_TE, scores_TE, counts_E, num_tokens=T)
        return Routing(expert_ids_TK, weights_TK, counts_E, aux_loss, z_loss)

    def _losses(
        self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, counts_E: torch.Tensor, *, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch load-balancing loss E·Σ_e f_e·P_e and z-loss mean(logsumexp²) over the *global* batch.

        f_e (share of routed copies) and the token count are all-reduced over the data-parallel ranks, so
        the loss does not depend on how the batch is split. Each rank returns its share scaled by dp_size:
        the mean over ranks is the global loss, and after the usual gradient averaging over ranks every
        router gradient equals the single-device gradient of the global loss.
        """
        zero = logits_TE.new_zeros(())
        if self.aux_loss_coef == 0 and self.z_loss_coef == 0:
            return zero, zero
        stats = torch.cat([counts_E.float(), logits_TE.new_full((1,), num_tokens)])  # a fill: no host copy
        if self.dp_group is not None:
            _all_reduce_sum(stats, group=self.dp_group)
        global_counts_E, global_tokens = stats[:-1], stats[-1]
        scale = self.dp_size / global_tokens.clamp_min(1)
        aux_loss = zero
        if self.aux_loss_coef > 0:
            probs_TE = (
                scores_TE if self.score_fn == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            )
            frac_E = global_counts_E / (global_tokens * self.top_k).clamp_min(1)
            aux_loss = self.num_experts * scale * (frac_E * probs_TE.sum(dim=0)).sum()
        z_loss = zero
        if self.z_loss_coef > 0:
            z_loss = scale * logits_TE.logsumexp(dim=-1).square().sum()
        return aux_loss, z_loss

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower the others.

        ``global_counts_E`` must be identical on all ranks (summed over the data-parallel group) so that the
        bias, and therefore every routing decision, stays identical across replicas.
        """
        if self.score_fn != "sigmoid" or self.bias_update_rate == 0:
            return
        load_E = global_counts_E.float()
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
