"""Decoder-only MoE transformer, written as single-device code.

Legend: B batch, S sequence, D model dim, H heads, Dh head dim, V vocab, C cache capacity (max positions).
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


class LayerKVCache:
    """Keys and values of one attention layer for the positions seen so far: [B, H, C, Dh] each."""

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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, S, D = x_BSD.shape

        def heads(t):
            return t.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.wq(x_BSD)), heads(self.wk(x_BSD)), heads(self.wv(x_BSD))
        if cache is None:
            q, k = apply_rope(q, cos[:S], sin[:S]), apply_rope(k, cos[:S], sin[:S])
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cos, sin = cos[start_pos : start_pos + S], sin[start_pos : start_pos + S]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = cache.update(k, v, start_pos)
            mask = None
            if S > 1:  # query i sits at position start_pos + i and sees keys up to there
                query_pos = torch.arange(start_pos, start_pos + S, device=x_BSD.device)
                mask = query_pos[:, None] >= torch.arange(start_pos + S, device=x_BSD.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, use_moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoELayer(cfg.dim, cfg.moe) if use_moe else SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x, cos, sin, cache: LayerKVCache | None = None, start_pos: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos)
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
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, tokens_BS: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Returns logits [B, S, V].

        With ``cache`` (inference), ``tokens_BS`` sit at positions [start_pos, start_pos + S): their keys and
        values are appended to the cache and they attend to every cached position before them.
        """
        if cache is not None and start_pos + tokens_BS.shape[1] > min(cache.capacity, self.rope_cos.shape[0]):
            raise ValueError(
                f"positions up to {start_pos + tokens_BS.shape[1] - 1} are past the context of "
                f"model.seq_len={self.cfg.seq_len} positions"
            )
        h = self.tok_embeddings(tokens_BS)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope_cos, self.rope_sin, None if cache is None else cache.layers[i], start_pos)
        return self.output(self.norm(h))

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
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.output.weight.device)

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
            local, offset = _local_shard(p)  # sharded parameters (engine=fsdp): each rank fills its part
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
            self.cfg.seq_len, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, dtype=self.rope_cos.dtype
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def _local_shard(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
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
    the embedding table (one multiply-add forward, two backward), plus causal attention, QKᵀ and AV over half
    the S×S square: 6·n_layers·D·S. What MFU counts as useful work."""
    cfg = model.cfg
    active = count_parameters(model)["active"] - model.tok_embeddings.weight.numel()
    return 6 * active + 6 * cfg.n_layers * cfg.dim * cfg.seq_len
