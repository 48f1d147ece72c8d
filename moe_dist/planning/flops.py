"""FLOPs of the Transformer by formula: the check on what the planner counts op by op. (Model FLOPs for MFU are
``moe_dist.model.transformer.model_flops_per_token``, the training logs' own count.)

Legend: B sequences per micro-batch, S sequence length, T = B·S tokens, D model dim, H query heads, Hkv key/value
heads, Dh head dim, V vocab, E experts, K experts per token, F expert hidden, R expert rows on this rank.

Counted convention (torch.utils.flop_counter's): a matmul [m, k] x [k, n] is 2·m·k·n; backward is twice the
forward, except attention, whose backward recomputes the scores (2.5x); causal attention is counted as the
full S x S square; recomputation (activation checkpointing, the chunked loss's logits, receive-budget rounds)
counts again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moe_dist.config import ModelConfig
from moe_dist.model.transformer import head_dim, kv_heads


def moe_layer_ids(m: ModelConfig) -> list[int]:
    if m.moe.num_experts == 0:
        return []
    return [i for i in range(m.n_layers) if i % m.moe.every_n_layers == 0]


@dataclass
class ForwardFlops:
    """Forward FLOPs of one micro-batch on one rank (counted convention), per layer and for the head."""

    attention_proj: list[int]
    attention_core: list[int]
    router: list[int]
    experts: list[int]
    shared_experts: list[int]
    dense_ffn: list[int]
    head: int

    def layer(self, i: int) -> int:
        return sum(getattr(self, f.name)[i] for f in fields(self) if f.name != "head")

    def total(self) -> int:
        return sum(self.layer(i) for i in range(len(self.experts))) + self.head


def forward_flops(m: ModelConfig, *, batch: int, expert_rows: list[int]) -> ForwardFlops:
    """``expert_rows``: rows this rank's experts process in each MoE layer (in layer order)."""
    S, D, L = m.seq_len, m.dim, m.n_layers
    T = batch * S
    H, Hkv, Dh = m.n_heads, kv_heads(m), head_dim(m)
    moe_ids = moe_layer_ids(m)
    rows = dict(zip(moe_ids, expert_rows))
    router_mms = 2 if m.moe.noisy_gate else 1
    shared = m.moe.num_shared_experts * m.moe.expert_hidden
    return ForwardFlops(
        attention_proj=[2 * T * D * H * Dh * 2 + 2 * 2 * T * D * Hkv * Dh] * L,
        attention_core=[4 * batch * H * S * S * Dh] * L,
        router=[router_mms * 2 * T * D * m.moe.num_experts if i in rows else 0 for i in range(L)],
        experts=[6 * rows[i] * D * m.moe.expert_hidden if i in rows else 0 for i in range(L)],
        shared_experts=[6 * T * D * shared if i in rows else 0 for i in range(L)],
        dense_ffn=[0 if i in rows else 6 * T * D * m.ffn_hidden for i in range(L)],
        head=2 * T * D * m.vocab_size,
    )


def recomputed_flops(forward: ForwardFlops, m: ModelConfig, *, checkpointing: str, rounds: int) -> int:
    """Forward FLOPs run a second time in backward: checkpointed blocks or expert computes, the chunked loss's
    logits (moe_dist.model.loss), expert computes of receive-budget rounds."""
    L = len(forward.experts)
    if checkpointing == "none":
        recomputed = 0
    elif checkpointing == "moe":  # stops early: the down projection's output is not needed by its backward
        recomputed = sum(e * 2 // 3 for e in forward.experts)  # the gate/up matmul: 4·R·D·F of 6·R·D·F
    else:
        every = 1 if checkpointing == "full" else int(checkpointing.partition(":")[2])
        recomputed = sum(forward.layer(i) for i in range(0, L, every))
    if rounds > 1:  # each round is checkpointed inside the dispatcher (nested in a checkpointed block too)
        recomputed += sum(forward.experts)
    if m.loss_chunk_tokens != 0:  # chunked loss (None = auto): logits again in backward
        recomputed += forward.head
    return recomputed


# trainer.freeze groups → the ForwardFlops fields whose weights they hold (model/build.py freeze_parameters).
FROZEN_MATMULS = {
    "router": ("router",),
    "experts": ("experts",),
    "dense": ("attention_proj", "shared_experts", "dense_ffn"),
    "embeddings": ("head",),
}


def training_flops(forward: ForwardFlops, *, recomputed: int = 0, frozen: tuple[str, ...] = ()) -> int:
    """Forward + backward (counted convention) of one micro-batch, plus ``recomputed`` forward FLOPs.

    ``frozen`` (trainer.freeze groups): their matmuls skip the weight gradient (their backward is one forward,
    not two). Exact unless both embeddings and dense are frozen (then the first attention block has no
    backward at all, which this does not subtract)."""
    attention = sum(forward.attention_core)
    weight_grads = forward.total() - attention
    for group in frozen:
        for name in FROZEN_MATMULS[group]:
            value = getattr(forward, name)
            weight_grads -= value if isinstance(value, int) else sum(value)
    return forward.total() + (forward.total() - attention) + weight_grads + int(2.5 * attention) + recomputed
