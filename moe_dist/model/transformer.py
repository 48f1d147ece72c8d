"""Decoder-only MoE transformer, written as single-device code.

Legend: B batch, S sequence, D model dim, H query heads, Hkv key/value heads, Dh head dim, V vocab,
C cache capacity (max positions).
Parallelism is applied afterwards by ``moe_dist.parallel.apply.parallelize_moe``; weights are initialised
by ``init_weights(seed)`` from one generator per parameter (and per *global* expert), so every world size
and EP degree starts from the same global weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_dist.config import ModelConfig
from moe_dist.model.loss import linear_cross_entropy
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer, SwiGLU


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh] in the rotate-half layout (the first and second half of a head form the pairs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """Rotates in the tables' dtype (fp32; fp64 in fp64 mode), returns the input dtype."""
    x1, x2 = x_BHSDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    acc = cos_SDh.dtype
    return (x_BHSDh.to(acc) * cos_SDh + rotated.to(acc) * sin_SDh).type_as(x_BHSDh)


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_heads


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


class DocumentMask:
    """Packed documents in each row: document ``doc_ids_BS[b, i]`` owns token i. Positions restart at 0 in
    every document (RoPE angles gathered per token) and a query attends only to earlier keys of its own
    document, so every document is computed exactly as if it ran alone.

    On CUDA attention runs in ``flex_attention`` (compiled) with a block mask, which skips whole blocks
    across documents; elsewhere in SDPA with a dense boolean mask [B, 1, S, S].
    """

    def __init__(
        self,
        doc_ids_BS: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        *,
        use_flex: bool | None = None,
    ):
        B, S = doc_ids_BS.shape
        positions_BS = document_positions(doc_ids_BS)
        self.cos, self.sin = rope_cos[positions_BS].unsqueeze(1), rope_sin[positions_BS].unsqueeze(1)
        self.block_mask = None
        if use_flex is None:
            use_flex = doc_ids_BS.device.type == "cuda" and _flex_attention() is not None
        if use_flex:
            assert _flex_attention() is not None, "this torch has no flex_attention"

            def same_document_causal(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc_ids_BS[b, q_idx] == doc_ids_BS[b, kv_idx])

            self.block_mask = _FLEX["block_mask"](
                same_document_causal, B, None, S, S, device=doc_ids_BS.device
            )
            self.dense_BSS = None
        else:
            causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
            self.dense_BSS = (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]) & causal_SS

    def attend(self, q, k, v, *, enable_gqa: bool) -> torch.Tensor:
        if self.block_mask is not None:
            return _flex_attention()(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.dense_BSS.unsqueeze(1), enable_gqa=enable_gqa
        )


def document_positions(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: i minus the index where its document starts."""
    index_BS = torch.arange(doc_ids_BS.shape[1], device=doc_ids_BS.device).expand_as(doc_ids_BS)
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    start_index_BS = torch.where(starts_BS, index_BS, 0).cummax(dim=1).values
    return index_BS - start_index_BS


_FLEX = {}


def _flex_attention():
    """torch.compile(flex_attention), built once (with a compiled create_block_mask, which otherwise
    evaluates the mask over all [B, S, S] positions); None where this torch has no flex_attention."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
            _FLEX["block_mask"] = torch.compile(create_block_mask)
        except ImportError:
            _FLEX["fn"] = None
    return _FLEX["fn"]


class LayerKVCache:
    """Keys and values of one attention layer for the positions seen so far: [B, Hkv, C, Dh] each."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k_BHCDh: torch.Tensor | None = None
        self.v_BHCDh: torch.Tensor | None = None

    def update(
        self, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes positions [start_pos, start_pos + S); returns keys and values of positions [0, start_pos + S)."""
        B, H, S, Dh = k_BHSDh.shape
        end = start_pos + S
        if self.k_BHCDh is None:
            self.k_BHCDh = k_BHSDh.new_zeros((B, H, self.capacity, Dh))
            self.v_BHCDh = v_BHSDh.new_zeros((B, H, self.capacity, Dh))
        self.k_BHCDh[:, :, start_pos:end] = k_BHSDh
        self.v_BHCDh[:, :, start_pos:end] = v_BHSDh
        return self.k_BHCDh[:, :, :end], self.v_BHCDh[:, :, :end]


class KVCache:
    """Per-layer key/value caches for incremental decoding (``Transformer.forward(tokens, cache=...)``)."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerKVCache(capacity) for _ in range(num_layers)]


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads (Hkv <= H), RoPE and optional QK-norm.

    ``qk_norm="head"`` normalises each head's query and key over Dh (Qwen3); ``"full"`` normalises the whole
    query projection [H·Dh] and key projection [Hkv·Dh] before the split into heads (OLMoE).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, kv_heads(cfg), head_dim(cfg)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, q_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else q_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv_dim, eps=cfg.norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
        doc_mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if doc_mask is not None:  # packed documents: positions restart and attention stops at each boundary
            q, k = apply_rope(q, doc_mask.cos, doc_mask.sin), apply_rope(k, doc_mask.cos, doc_mask.sin)
            out = doc_mask.attend(q, k, v, enable_gqa=gqa)
        elif cache is None:
            q, k = apply_rope(q, cos[:S], sin[:S]), apply_rope(k, cos[:S], sin[:S])
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            cos, sin = cos[start_pos : start_pos + S], sin[start_pos : start_pos + S]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = cache.update(k, v, start_pos)
            mask = None
            if S > 1:  # query i sits at position start_pos + i and sees keys up to there
                query_pos = torch.arange(start_pos, start_pos + S, device=x_BSD.device)
                mask = query_pos[:, None] >= torch.arange(start_pos + S, device=x_BSD.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, use_moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoELayer(cfg.dim, cfg.moe) if use_moe else SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x, cos, sin, cache: LayerKVCache | None = None, start_pos: int = 0, doc_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, doc_mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, use_moe=cfg.moe.num_experts > 0 and i % cfg.moe.every_n_layers == 0)
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, head_dim(cfg), cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head [V, D]: the token embeddings when they are tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        tokens_BS: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        *,
        targets_BS: torch.Tensor | None = None,
        doc_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits [B, S, V]; with ``targets_BS``, the mean cross-entropy over the targets that are
        not ``IGNORE_INDEX`` instead (computed in chunks: the full logits never exist).

        ``doc_ids_BS``: the document of every token of a packed row (``DocumentMask``).
        With ``cache`` (inference), ``tokens_BS`` sit at positions [start_pos, start_pos + S): their keys and
        values are appended to the cache and they attend to every cached position before them.
        """
        if cache is not None and start_pos + tokens_BS.shape[1] > min(cache.capacity, self.rope_cos.shape[0]):
            raise ValueError(
                f"positions up to {start_pos + tokens_BS.shape[1] - 1} are past the context of "
                f"model.seq_len={self.cfg.seq_len} positions"
            )
        assert cache is None or doc_ids_BS is None, "document masking is for training, not cached decoding"
        doc_mask = None if doc_ids_BS is None else DocumentMask(doc_ids_BS, self.rope_cos, self.rope_sin)
        h = self.tok_embeddings(tokens_BS)
        for i, layer in enumerate(self.layers):
            h = layer(
                h,
                self.rope_cos,
                self.rope_sin,
                None if cache is None else cache.layers[i],
                start_pos,
                doc_mask,
            )
        h = self.norm(h)
        if targets_BS is None:
            return F.linear(h, self.head_weight)
        total, count = linear_cross_entropy(
            h.flatten(0, 1), self.head_weight, targets_BS.flatten(), chunk_tokens=self.cfg.loss_chunk_tokens
        )
        return total / count.clamp_min(1)

    def compile_blocks(self, **options) -> None:
        """Regional compilation (``trainer.compile``): each block's forward compiled on its own, one graph per
        kind of block, reused by every block of that kind. The MoE exchange stays eager
        (``MoELayer.routed_experts``): the graph breaks around it, never inside the dense parts."""
        for layer in self.layers:
            layer.compile(**options)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for up to model.seq_len positions."""
        return KVCache(len(self.layers), self.cfg.seq_len)

    def moe_layers(self) -> Iterator[MoELayer]:
        return (layer.ffn for layer in self.layers if isinstance(layer.ffn, MoELayer))

    def moe_loss(self) -> torch.Tensor:
        """Weighted aux + z losses of the last forward, summed over MoE layers."""
        losses = [m.stats.weighted_loss(m.cfg) for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.head_weight.device)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic in ``seed`` alone: one generator per parameter name, and per global expert."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2 scaling)
        expert_params = {}
        for mod_name, mod in self.named_modules():
            if isinstance(mod, GroupedExperts):
                expert_params[f"{mod_name}.w_gate_up"] = (mod, std)
                expert_params[f"{mod_name}.w_down"] = (mod, out_std)
        for name, p in self.named_parameters():
            local, offset = local_shard(p)  # sharded parameters (engine=fsdp): each rank fills its part
            if name in expert_params:
                mod, p_std = expert_params[name]
                first = offset[0] if isinstance(p, DTensor) else mod.expert_offset
                for i in range(local.shape[0]):  # global expert id → generator: same weights at any EP degree
                    key = f"{name}[{first + i}]"
                    _fill_normal(local[i], p_std, seed, key, full_shape=p.shape[1:], offset=offset[1:])
            elif name.endswith("norm.weight"):
                local.fill_(1.0)
            elif name.endswith("noise_weight"):
                local.zero_()
            else:
                is_out = name.endswith(("wo.weight", "w_down.weight"))
                _fill_normal(local, out_std if is_out else std, seed, name, full_shape=p.shape, offset=offset)
        for m in self.moe_layers():
            m.router.expert_bias.zero_()
        cos, sin = rope_tables(
            self.cfg.seq_len, head_dim(self.cfg), self.cfg.rope_theta, dtype=self.rope_cos.dtype
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of ``p`` this rank holds and its offset in the full tensor (a plain tensor: all of it)."""
    if isinstance(p, DTensor):
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.to_local(), tuple(offset)
    return p, (0,) * p.dim()


def _fill_normal(
    t: torch.Tensor, std: float, seed: int, key: str, *, full_shape=None, offset: tuple[int, ...] = ()
) -> None:
    """``t`` ← its slice (at ``offset``) of N(0, std²) drawn for the full tensor by a generator of (seed, key).

    The full tensor is drawn on every rank (one parameter, or one expert, at a time): a generator's stream
    cannot be entered in the middle, and the values must not depend on how the tensor is sharded.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62))
    full = torch.randn(full_shape or t.shape, generator=gen) * std
    t.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, t.shape))])


def count_parameters(model: Transformer) -> dict[str, int]:
    """Global parameter counts: total, and active per token (top_k of the routed experts)."""
    cfg = model.cfg
    total = active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if ".experts." in name:
            per_expert = n // p.shape[0]
            total += per_expert * cfg.moe.num_experts
            active += per_expert * cfg.moe.top_k
        else:
            total += n
            active += n
    return {"total": total, "active": active}


def model_flops_per_token(model: Transformer) -> float:
    """Training FLOPs per token (forward and backward) of the architecture: 6 per active parameter outside
    the embedding lookup (one multiply-add forward, two backward; a tied embedding still is the head's
    matmul), plus causal attention, QKᵀ and AV over half the S×S square at the query width (GQA shares K/V
    heads, not the products): 6·n_layers·n_heads·head_dim·S. What MFU counts as useful work."""
    cfg = model.cfg
    lookup = model.tok_embeddings.weight.numel() if model.output is not None else 0
    active = count_parameters(model)["active"] - lookup
    return 6 * active + 6 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * cfg.seq_len
