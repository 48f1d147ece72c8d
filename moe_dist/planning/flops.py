"""FLOPs of the Transformer by formula: the check on what the planner counts op by op, and the model FLOPs of MFU.

Legend: B sequences per micro-batch, S sequence length, T = B·S tokens, D model dim, H query heads, Hkv key/value
heads, Dh head dim, V vocab, E experts, K experts per token, F expert hidden, R expert rows on this rank.

Counted convention (torch.utils.flop_counter's): a matmul [m, k] x [k, n] is 2·m·k·n; backward is twice the
forward, except attention, whose backward recomputes the scores (2.5x); causal attention is counted as the
full S x S square. MFU convention (model FLOPs, the usual 6·N·tokens): no recomputation, causal attention
counted as the half that is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_dist.config import ModelConfig


def _heads(m: ModelConfig) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim)."""
    head_dim = getattr(m, "head_dim", None) or m.dim // m.n_heads
    kv_heads = getattr(m, "n_kv_heads", None) or m.n_heads
    return m.n_heads, kv_heads, head_dim


def moe_layer_ids(m: ModelConfig) -> list[int]:
    if m.moe.num_experts == 0:
        return []
    return [i for i in range(m.n_layers) if i % m.moe.every_n_layers == 0]


@dataclass
class ForwardFlops:
    """Forward FLOPs of one micro-batch on one rank, by part (counted convention)."""

    attention_proj: int = 0
    attention_core: int = 0
    router: int = 0
    experts: int = 0
    shared_experts: int = 0
    dense_ffn: int = 0
    head: int = 0

    def total(self) -> int:
        return sum(vars(self).values())


def forward_flops(m: ModelConfig, *, batch: int, expert_rows: list[int]) -> ForwardFlops:
    """``expert_rows``: rows this rank's experts process in each MoE layer (in layer order)."""
    S, D = m.seq_len, m.dim
    T = batch * S
    H, Hkv, Dh = _heads(m)
    f = ForwardFlops()
    f.attention_proj = m.n_layers * (2 * T * D * H * Dh * 2 + 2 * 2 * T * D * Hkv * Dh)
    f.attention_core = m.n_layers * 4 * batch * H * S * S * Dh
    num_moe = len(moe_layer_ids(m))
    E = m.moe.num_experts
    router_mms = 2 if m.moe.noisy_gate else 1
    f.router = num_moe * router_mms * 2 * T * D * E
    f.experts = sum(6 * rows * D * m.moe.expert_hidden for rows in expert_rows)
    f.shared_experts = num_moe * 6 * T * D * m.moe.num_shared_experts * m.moe.expert_hidden
    f.dense_ffn = (m.n_layers - num_moe) * 6 * T * D * m.ffn_hidden
    f.head = 2 * T * D * m.vocab_size
    return f


def training_flops(forward: ForwardFlops, *, recomputed_experts: int = 0) -> int:
    """Forward + backward (counted convention) of one micro-batch; ``recomputed_experts``: expert FLOPs run a
    second time in backward (receive-budget rounds are checkpointed)."""
    attention = forward.attention_core
    return 3 * (forward.total() - attention) + attention + int(2.5 * attention) + recomputed_experts


def model_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token for MFU: 6 x the matmul parameters a token meets (routed experts: top_k of them)
    plus causal attention (fwd + bwd: 3 x 2·2·S·H·Dh / 2 per layer)."""
    D, S = m.dim, m.seq_len
    H, Hkv, Dh = _heads(m)
    num_moe = len(moe_layer_ids(m))
    top_k = m.moe.num_experts if m.moe.router == "soft" else m.moe.top_k
    per_token_params = (
        m.n_layers * (2 * D * H * Dh + 2 * D * Hkv * Dh)
        + num_moe * D * m.moe.num_experts * (2 if m.moe.noisy_gate else 1)
        + num_moe * 3 * D * m.moe.expert_hidden * (top_k + m.moe.num_shared_experts)
        + (m.n_layers - num_moe) * 3 * D * m.ffn_hidden
        + D * m.vocab_size
    )
    attention = m.n_layers * 3 * 2 * S * H * Dh  # 3 x (QK^T + PV) x 2 FLOPs x S^2 / 2, per token
    return 6 * per_token_params + attention
