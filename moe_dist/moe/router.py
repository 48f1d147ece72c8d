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
from moe_dist.precision import accum_dtype, full_precision


@torch.compiler.disable
def _all_reduce_sum(t: torch.Tensor, *, group: dist.ProcessGroup) -> None:
    """In place, eagerly (under torch.compile the graph breaks here: the collective stays out of the graph)."""
    dist.all_reduce(t, group=group)


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # int64, global expert ids
    weights_TK: torch.Tensor  # gate weights in accum_dtype: fp32 (fp64 in fp64 mode), differentiable
    counts_E: torch.Tensor  # int64 token copies per expert on this rank (before capacity drops)
    aux_loss: torch.Tensor  # scalar in accum_dtype, this rank's share (see Router._losses)
    z_loss: torch.Tensor  # scalar in accum_dtype, this rank's share


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
        self.aux_loss_scope = cfg.aux_loss_scope
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        self.noise_weight = nn.Parameter(torch.empty(cfg.num_experts, dim)) if cfg.noisy_gate else None
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # Set by parallelize_moe: the ranks that see different tokens and average dense gradients.
        self.dp_group: dist.ProcessGroup | None = None
        self.dp_size = 1
        nn.init.normal_(self.weight, std=0.02)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: torch.Tensor, *, seq_len: int | None = None) -> Routing:
        """Routes the T rows of ``x_TD``; rows are sequence-major with ``seq_len`` tokens per sequence (None:
        one sequence), which only the ``sequence`` aux-loss scope reads.

        All router math runs with autocast off, in float32 (float64 when the weights are float64): under bf16
        autocast ``F.linear`` would return bf16 scores even from float32 inputs, and top-k choices and the
        sigmoid bias steering would then run on ~3 significant digits.
        """
        with full_precision(x_TD.device):
            acc = accum_dtype(self.weight)
            x_TD = x_TD.to(acc)
            logits_TE = F.linear(x_TD, self.weight.to(acc))
            if self.noise_weight is not None and self.training:
                noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(acc)))
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
                    select_TE = scores_TE + self.expert_bias.to(acc)
                expert_ids_TK = select_TE.topk(self.top_k, dim=-1).indices
                weights_TK = scores_TE.gather(-1, expert_ids_TK)
            if self.norm_topk and self.score_fn != "soft":
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

            T, E = logits_TE.shape
            counts_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
            counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK.reshape(-1)))
            aux_loss, z_loss = self._losses(
                logits_TE, scores_TE, expert_ids_TK, counts_E, seq_len=T if seq_len is None else seq_len
            )
        return Routing(expert_ids_TK, weights_TK, counts_E, aux_loss, z_loss)

    def _losses(
        self,
        logits_TE: torch.Tensor,
        scores_TE: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        counts_E: torch.Tensor,
        *,
        seq_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load-balancing loss E·Σ_e f_e·P_e and z-loss mean(logsumexp²), means over the *global* batch.

        ``micro_step`` scope (Switch): f_e (share of routed copies) and P_e (mean probability) over every
        token of the micro-step on all data-parallel ranks. ``sequence`` scope (DeepSeek-V3): f and P per
        sequence, the loss averaged over the sequences; no split of the batch into ranks or micro-steps can
        change it. Token and sequence counts (and f for micro_step) are all-reduced over the data-parallel
        ranks, and each rank returns its share scaled by dp_size: the mean over ranks is the global loss, and
        after the usual gradient averaging every router gradient equals the single-device gradient.
        """
        zero = logits_TE.new_zeros(())
        if self.aux_loss_coef == 0 and self.z_loss_coef == 0:
            return zero, zero
        T, E = logits_TE.shape
        seq_len = max(seq_len, 1)  # no tokens: no sequences
        assert T % seq_len == 0, (T, seq_len)
        num_sequences = T // seq_len
        # Integer counts summed in float64: exact up to 2**53 at any batch size. The token and sequence
        # counts are device fills (a host-to-device copy would make the host wait on CUDA; so would
        # ``sizes[1] = n``, a copy from a CPU scalar tensor: moe_dist.plan counts it).
        sizes = counts_E.new_full((2,), T, dtype=torch.float64)
        sizes[1].fill_(num_sequences)
        stats = torch.cat([counts_E.double(), sizes])
        if self.dp_group is not None:
            _all_reduce_sum(stats, group=self.dp_group)
        stats = stats.to(logits_TE.dtype)
        global_counts_E, global_tokens, global_sequences = stats[:-2], stats[-2], stats[-1]
        aux_loss = zero
        if self.aux_loss_coef > 0:
            probs_TE = (
                scores_TE if self.score_fn == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            )
            if self.aux_loss_scope == "sequence":
                ids_BN = expert_ids_TK.reshape(num_sequences, seq_len * self.top_k)
                counts_BE = logits_TE.new_zeros(num_sequences, E).scatter_add_(
                    1, ids_BN, logits_TE.new_ones(ids_BN.shape)
                )
                frac_BE = counts_BE / (seq_len * self.top_k)
                mean_probs_BE = probs_TE.view(num_sequences, seq_len, E).mean(dim=1)
                scale = self.dp_size / global_sequences.clamp_min(1)
                aux_loss = self.num_experts * scale * (frac_BE * mean_probs_BE).sum()
            else:
                frac_E = global_counts_E / (global_tokens * self.top_k).clamp_min(1)
                scale = self.dp_size / global_tokens.clamp_min(1)
                aux_loss = self.num_experts * scale * (frac_E * probs_TE.sum(dim=0)).sum()
        z_loss = zero
        if self.z_loss_coef > 0:
            z_loss = self.dp_size / global_tokens.clamp_min(1) * logits_TE.logsumexp(dim=-1).square().sum()
        return aux_loss, z_loss

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower the others.

        ``global_counts_E`` must be identical on all ranks (summed over the data-parallel group) so that the
        bias, and therefore every routing decision, stays identical across replicas.
        """
        if self.score_fn != "sigmoid" or self.bias_update_rate == 0:
            return
        load_E = global_counts_E.to(self.expert_bias.dtype)
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
