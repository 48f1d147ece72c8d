"""Hugging Face interop: export a checkpoint as a transformers model directory; start training from one.

Export picks the transformers architecture that computes exactly what the moe_dist model computes:

    Mixtral            softmax top-k with renormalised weights (or the soft mixture: top-k = all experts,
                       router weights / temperature), no shared experts, an MoE FFN in every block
    GraniteMoeShared   the same routing plus always-on (ungated) shared experts (multipliers set to 1)
    Qwen2-MoE          softmax top-k with or without renormalisation, dense FFN blocks at any positions
                       (``mlp_only_layers``), no shared experts (its sigmoid-gated shared expert has width 0)
    GLM-4-MoE          sigmoid router whose selection bias is ``e_score_correction_bias`` (DeepSeek-V3
                       routing without MLA), ungated shared experts; n_group = 1, routed scaling 1, full RoPE;
                       per-head QK-norm optional (``use_qk_norm``)
    Qwen3-MoE          softmax top-k (normalised or not), per-head QK-norm, dense blocks at any positions
    OLMoE              softmax top-k (normalised or not), QK-norm over the whole q / k projections
    Llama, Qwen3       dense models (model.moe.num_experts = 0), without / with per-head QK-norm

all with grouped-query attention, any head_dim and tied or untied embeddings, and refuses, with a
ValueError naming the feature, a model none of them computes. The files use the names and layouts that
``save_pretrained`` writes (per expert, ``experts.{e}.w1``..., except Granite's stacked ``input_linear``),
hold the *global* experts whatever EP the checkpoint was saved at, and load with
``AutoModelForCausalLM.from_pretrained``.

One list of ``TensorMapping``s per architecture (``hf_tensor_mappings``) names every Hugging Face tensor and
the moe_dist tensor it comes from; export and import both run from it.

Import (``init_from_hf``) reads local Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, Llama and Qwen3 directories
(config.json + safetensors, per-expert or fused expert layout), each rank only its expert shard; it never
downloads. Only json and safetensors are needed here, not transformers.

Legend: E experts, L local experts, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from moe_dist.config import ModelConfig
from moe_dist.model.transformer import Transformer, head_dim, kv_heads, local_shard
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.mesh import Mesh

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "granitemoeshared": "GraniteMoeSharedForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- export


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers ``model_type`` that computes this model exactly; ValueError naming what has none."""
    moe = cfg.moe
    if cfg.qk_norm == "full":
        return _full_qk_norm_type(cfg)
    if cfg.qk_norm == "head":
        return _per_head_qk_norm_type(cfg)
    if moe.num_experts == 0:
        return "llama"
    renormalised = moe.norm_topk or moe.router == "soft"  # soft weights already sum to 1 over all experts
    shared, interleaved = moe.num_shared_experts > 0, moe.every_n_layers > 1
    if moe.router == "sigmoid":
        if interleaved:
            raise ValueError(
                f"model.moe.every_n_layers={moe.every_n_layers} with model.moe.router='sigmoid': cannot export "
                "to Hugging Face exactly. The sigmoid-routed architectures (GLM-4-MoE, DeepSeek-V3) only "
                "place dense blocks first (first_k_dense_replace); moe_dist interleaves them starting with an "
                "MoE block at layer 0"
            )
        return "glm4_moe"
    if shared:
        if interleaved:
            raise ValueError(
                f"model.moe.num_shared_experts={moe.num_shared_experts} with model.moe.every_n_layers="
                f"{moe.every_n_layers}: cannot export to Hugging Face exactly. The softmax-routed MoE with "
                "dense blocks (Qwen2-MoE) multiplies its shared expert by a learned sigmoid gate, while "
                "moe_dist's shared experts are ungated; GraniteMoeShared (ungated) has no dense blocks"
            )
        if not renormalised:
            raise ValueError(
                f"model.moe.num_shared_experts={moe.num_shared_experts} with model.moe.norm_topk=false: cannot "
                "export to Hugging Face exactly. Qwen2-MoE (unnormalised top-k) gates its shared expert with a "
                "sigmoid, unlike moe_dist; GraniteMoeShared (ungated shared experts) always renormalises"
            )
        return "granitemoeshared"
    if interleaved or not renormalised:
        return "qwen2_moe"
    return "mixtral"


def _full_qk_norm_type(cfg: ModelConfig) -> str:
    """QK-norm over the whole projections: OLMoE (softmax top-k, an MoE FFN in every block, no shared experts)."""
    moe, why = cfg.moe, None
    if moe.num_experts == 0:
        why = "dense models with it (OLMo-2) also move the block norms after attention and MLP"
    elif moe.router == "sigmoid" or moe.num_shared_experts or moe.every_n_layers > 1:
        why = "OLMoE, the MoE that has it, routes by softmax with no shared experts and an MoE FFN in every block"
    elif head_dim(cfg) * cfg.n_heads != cfg.dim:
        why = f"OLMoE normalises queries over hidden_size, so model.head_dim={cfg.head_dim} must be dim / n_heads"
    if why:
        raise ValueError(f"model.qk_norm='full': cannot export to Hugging Face exactly: {why}")
    return "olmoe"


def _per_head_qk_norm_type(cfg: ModelConfig) -> str:
    """QK-norm per head: Qwen3 (dense), Qwen3-MoE (softmax, no shared experts) or GLM-4-MoE (sigmoid)."""
    moe = cfg.moe
    if moe.num_experts == 0:
        return "qwen3"
    if moe.router == "sigmoid":
        if moe.every_n_layers > 1:
            raise ValueError(
                f"model.moe.every_n_layers={moe.every_n_layers} with model.moe.router='sigmoid': cannot export "
                "to Hugging Face exactly (GLM-4-MoE only places dense blocks first)"
            )
        return "glm4_moe"
    if moe.num_shared_experts:
        raise ValueError(
            f"model.moe.num_shared_experts={moe.num_shared_experts} with model.qk_norm='head': cannot export to "
            "Hugging Face exactly. Qwen3-MoE has no shared experts; GraniteMoeShared has no QK-norm"
        )
    return "qwen3_moe"


def _check_exportable(cfg: ModelConfig) -> str:
    model_type = hf_model_type(cfg)
    if cfg.moe.num_experts and cfg.moe.capacity_factor is not None:
        warnings.warn(
            f"model.moe.capacity_factor={cfg.moe.capacity_factor}: the exported {ARCHITECTURES[model_type]} "
            "routes without capacity limits; its logits equal moe_dist's wherever no token copy is dropped",
            stacklevel=3,
        )
    return model_type


def hf_config(cfg: ModelConfig, model_type: str, *, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for ``model_type``: every field that changes the computation is set explicitly."""
    moe = cfg.moe
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": kv_heads(cfg),
        "head_dim": head_dim(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": None,  # byte-level vocabularies have no special tokens
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    top_k = moe.num_experts if moe.router == "soft" else moe.top_k
    norm_topk_prob = moe.norm_topk and moe.router != "soft"
    mlp_only_layers = [i for i in range(cfg.n_layers) if i % moe.every_n_layers != 0]
    if model_type == "llama":
        out.update(intermediate_size=cfg.ffn_hidden, mlp_bias=False)
    elif model_type == "qwen3":
        out.update(intermediate_size=cfg.ffn_hidden, use_sliding_window=False, sliding_window=None)
    elif model_type == "mixtral":
        out.update(
            intermediate_size=moe.expert_hidden,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=top_k,
            sliding_window=None,
            router_jitter_noise=0.0,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
    elif model_type == "granitemoeshared":
        out.update(
            intermediate_size=moe.expert_hidden,
            shared_intermediate_size=moe.num_shared_experts * moe.expert_hidden,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=top_k,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            attention_multiplier=head_dim(cfg) ** -0.5,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        out.update(
            intermediate_size=cfg.ffn_hidden,
            moe_intermediate_size=moe.expert_hidden,
            num_experts=moe.num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=mlp_only_layers,
            use_sliding_window=False,
            sliding_window=None,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
        if model_type == "qwen2_moe":
            out.update(shared_expert_intermediate_size=0, qkv_bias=False)
    elif model_type == "olmoe":
        out.update(
            intermediate_size=moe.expert_hidden,
            num_experts=moe.num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_topk_prob,
            clip_qkv=None,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
    elif model_type == "glm4_moe":
        rope["partial_rotary_factor"] = 1.0
        out.update(
            intermediate_size=cfg.ffn_hidden,
            moe_intermediate_size=moe.expert_hidden,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=moe.norm_topk,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            use_qk_norm=cfg.qk_norm == "head",
            num_nextn_predict_layers=0,
        )
    return out


@dataclass(frozen=True)
class TensorMapping:
    """One tensor of the Hugging Face files and where it lives in moe_dist's *global* state dict.

    Export computes ``to_hf`` from our tensors; import fills our (possibly EP-sharded) parameters from the
    Hugging Face tensor with ``load``. The same list drives both directions, so they cannot disagree.
    """

    hf: str  # tensor name in the Hugging Face files
    ours: tuple[str, ...] = ()  # moe_dist state-dict keys; several are concatenated on dim 0
    expert: int | None = None  # global expert id: one expert's slice of a stacked [E, ...] tensor
    part: str = "all"  # of one expert's w_gate_up [D, 2F]: "gate" ([:, :F]) or "up" ([:, F:])
    transpose: bool = False  # the last two dims swapped (moe_dist's [D, F] expert layout vs nn.Linear's)
    scale: float = 1.0  # hf = ours * scale (the soft router's 1 / temperature)
    const_shape: tuple[int, ...] | None = None  # a zero tensor with no moe_dist counterpart
    keep_fp32: bool = False  # stays fp32 whatever the export dtype (GLM-4's e_score_correction_bias)

    def to_hf(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The Hugging Face tensor from ``get(key)``, which returns a global moe_dist tensor."""
        if self.const_shape is not None:
            return torch.zeros(self.const_shape)
        t = torch.cat([get(k) for k in self.ours]) if len(self.ours) > 1 else get(self.ours[0])
        if self.expert is not None:
            t = t[self.expert]
        if self.part != "all":
            F = t.shape[-1] // 2
            t = t[..., :F] if self.part == "gate" else t[..., F:]
        if self.transpose:
            t = t.transpose(-2, -1)
        return t * self.scale if self.scale != 1.0 else t

    def load(
        self, tensors: _SafetensorsDir, params: dict[str, torch.Tensor], offsets: dict[str, int]
    ) -> None:
        """Copies the Hugging Face tensor into our parameter(s); expert tensors only where this rank holds them.

        ``offsets[key]`` is the global id of local expert 0 of a stacked expert tensor (absent: not stacked).
        """
        if self.const_shape is not None:
            return
        if len(self.ours) > 1:  # concatenated on dim 0: split back
            src = tensors.get(self.hf)
            for key, piece in zip(self.ours, src.split([params[k].shape[0] for k in self.ours])):
                _copy(params[key], piece, self.hf)
            return
        key = self.ours[0]
        dst = params[key]
        if key in offsets:
            first, num_local = offsets[key], dst.shape[0]
            if self.expert is None:  # a stacked tensor of all experts: read this rank's rows only
                src = tensors.get(self.hf, slice(first, first + num_local))
            elif first <= self.expert < first + num_local:
                dst, src = dst[self.expert - first], tensors.get(self.hf)
            else:
                return
        else:
            src = tensors.get(self.hf)
        if self.transpose:
            src = src.transpose(-2, -1)
        if self.part != "all":
            F = dst.shape[-1] // 2
            dst = dst[..., :F] if self.part == "gate" else dst[..., F:]
        _copy(dst, src / self.scale if self.scale != 1.0 else src, self.hf)


# Names of the routed-expert projections per architecture (gate, up, down), and of the MoE block.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_MOE_BLOCK = {"mixtral": "block_sparse_moe", "granitemoeshared": "block_sparse_moe"}


def hf_tensor_mappings(
    cfg: ModelConfig, model_type: str, *, fused_experts: bool = False
) -> list[TensorMapping]:
    """Every tensor of a ``model_type`` directory for this model, in file order.

    ``fused_experts``: the MoE block as transformers 5 holds it in memory (``mlp.experts.gate_up_proj``
    [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]) instead of the names ``save_pretrained`` writes.
    """
    moe, M = cfg.moe, TensorMapping
    out = [M("model.embed_tokens.weight", ("tok_embeddings.weight",))]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        out += [
            M(f"{hf}.input_layernorm.weight", (f"{ours}.attn_norm.weight",)),
            *(M(f"{hf}.self_attn.{p}_proj.weight", (f"{ours}.attn.w{p}.weight",)) for p in "qkvo"),
        ]
        if cfg.qk_norm != "none":
            out += [M(f"{hf}.self_attn.{p}_norm.weight", (f"{ours}.attn.{p}_norm.weight",)) for p in "qk"]
        out.append(M(f"{hf}.post_attention_layernorm.weight", (f"{ours}.ffn_norm.weight",)))
        ffn = f"{ours}.ffn"
        if moe.num_experts == 0 or i % moe.every_n_layers != 0:  # a dense block
            out += [M(f"{hf}.mlp.{n}_proj.weight", (f"{ffn}.w_{n}.weight",)) for n in ("gate", "up", "down")]
            continue
        block = f"{hf}.{'mlp' if fused_experts else _MOE_BLOCK.get(model_type, 'mlp')}"
        router_scale = 1 / moe.temperature if moe.router == "soft" else 1.0
        w_gate_up, w_down = f"{ffn}.experts.w_gate_up", f"{ffn}.experts.w_down"
        if model_type == "granitemoeshared":
            out += [
                M(f"{block}.router.layer.weight", (f"{ffn}.router.weight",), scale=router_scale),
                M(f"{block}.input_linear.weight", (w_gate_up,), transpose=True),
                M(f"{block}.output_linear.weight", (w_down,), transpose=True),
            ]
            if moe.num_shared_experts:
                shared = f"{ffn}.shared_experts"
                out += [
                    M(
                        f"{hf}.shared_mlp.input_linear.weight",
                        (f"{shared}.w_gate.weight", f"{shared}.w_up.weight"),
                    ),
                    M(f"{hf}.shared_mlp.output_linear.weight", (f"{shared}.w_down.weight",)),
                ]
            continue
        out.append(M(f"{block}.gate.weight", (f"{ffn}.router.weight",), scale=router_scale))
        if fused_experts:
            out += [
                M(f"{block}.experts.gate_up_proj", (w_gate_up,), transpose=True),
                M(f"{block}.experts.down_proj", (w_down,), transpose=True),
            ]
        else:
            gate, up, down = _EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
            for e in range(moe.num_experts):
                expert = f"{block}.experts.{e}"
                out += [
                    M(f"{expert}.{gate}.weight", (w_gate_up,), expert=e, part="gate", transpose=True),
                    M(f"{expert}.{up}.weight", (w_gate_up,), expert=e, part="up", transpose=True),
                    M(f"{expert}.{down}.weight", (w_down,), expert=e, transpose=True),
                ]
        D = cfg.dim
        if model_type == "qwen2_moe":  # width-0 shared expert: its gated output is exactly 0
            out += [
                M(f"{block}.shared_expert.gate_proj.weight", const_shape=(0, D)),
                M(f"{block}.shared_expert.up_proj.weight", const_shape=(0, D)),
                M(f"{block}.shared_expert.down_proj.weight", const_shape=(D, 0)),
                M(f"{block}.shared_expert_gate.weight", const_shape=(1, D)),
            ]
        elif model_type == "glm4_moe":
            out.append(
                M(f"{block}.gate.e_score_correction_bias", (f"{ffn}.router.expert_bias",), keep_fp32=True)
            )
            width = moe.num_shared_experts * moe.expert_hidden
            for name, shape in (("gate", (width, D)), ("up", (width, D)), ("down", (D, width))):
                shared = f"{block}.shared_experts.{name}_proj.weight"
                out.append(
                    M(shared, (f"{ffn}.shared_experts.w_{name}.weight",))
                    if width
                    else M(shared, const_shape=shape)
                )
    out.append(M("model.norm.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(M("lm_head.weight", ("output.weight",)))
    return out


def export_model(model: Transformer, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> str:
    """Writes config.json, model.safetensors and moe_dist.json for an unsharded model; returns the model_type."""
    cfg = model.cfg
    model_type = _check_exportable(cfg)
    for layer in model.moe_layers():
        if layer.experts.num_local_experts != cfg.moe.num_experts:
            raise ValueError("export needs every expert in one process: load the model with a world-1 mesh")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = {
        m.hf: (t if m.keep_fp32 else t.to(dtype)).contiguous()
        for m in hf_tensor_mappings(cfg, model_type)
        for t in (m.to_hf(state.__getitem__),)
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, model_type, dtype=dtype), indent=2) + "\n")
    (out / "moe_dist.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS_FILE, (out / "config.json").stat().st_mode)  # save_file makes it owner-only
    return model_type


# ---------------------------------------------------------------------------------------------- import


def _local_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(
            f"model.init_from={str(path)!r}: not a local directory; hub downloads are never attempted"
        )
    if not (p / "config.json").is_file():
        raise ValueError(
            f"model.init_from={str(path)!r}: no config.json (not a Hugging Face model directory)"
        )
    return p


def _read_hf_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


IMPORTABLE = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "llama", "qwen3")
_DEFAULT_ROPE_THETA = {"mixtral": 1e6}  # transformers' defaults when a config.json names none (else 1e4)


def model_config_from_hf(path: str | Path) -> dict:
    """Overrides (``{"model.dim": 32, ...}``) that make a moe_dist model match a local Hugging Face directory.

    Reads Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE (without a shared expert), Llama and Qwen3 directories:
    grouped-query attention, head_dim, QK-norm and tied embeddings included. ``hydra_overrides`` gives the
    command-line form (``python -m moe_dist.hf overrides DIR`` prints it). Raises ValueError naming any
    feature moe_dist does not compute (RoPE scaling, attention biases, QKV clipping, a gated shared expert,
    ...). model.seq_len is left to the run.
    """
    p = _local_dir(path)
    hf = _read_hf_config(p)
    where = f"model.init_from={str(path)!r}"
    model_type = hf.get("model_type")
    if model_type not in IMPORTABLE:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; importable: {', '.join(IMPORTABLE)}"
        )

    def refuse(feature: str) -> ValueError:
        return ValueError(f"{where}: {feature} is not supported by moe_dist")

    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    kv = hf.get("num_key_value_heads") or heads
    hdim = hf.get("head_dim") or dim // heads
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={hf['hidden_act']!r} (SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("qkv_bias") or hf.get("mlp_bias"):
        raise refuse("a bias in the attention or MLP projections")
    if hf.get("clip_qkv") is not None:
        raise refuse(f"clip_qkv={hf['clip_qkv']} (clamping of q, k and v)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(
            f"RoPE {rope_type!r} with partial_rotary_factor={rope.get('partial_rotary_factor', 1.0)}"
        )
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA.get(model_type, 1e4)))
    qk_norm = {"qwen3_moe": "head", "qwen3": "head", "olmoe": "full"}.get(model_type, "none")
    out = {
        "model.vocab_size": hf["vocab_size"],
        "model.dim": dim,
        "model.n_layers": hf["num_hidden_layers"],
        "model.n_heads": heads,
        "model.n_kv_heads": None if kv == heads else kv,
        "model.head_dim": None if hdim * heads == dim else hdim,
        "model.qk_norm": qk_norm,
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.rope_theta": float(rope_theta),
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
    }
    if model_type in ("llama", "qwen3"):
        return {**out, "model.ffn_hidden": hf["intermediate_size"], "model.moe.num_experts": 0}
    moe = {"model.moe.router": "softmax", "model.moe.num_shared_experts": 0}
    # Released Qwen / OLMoE files say num_experts; transformers 5 writes its alias num_local_experts.
    num_experts = hf.get("num_local_experts", hf.get("num_experts"))
    if model_type == "mixtral":
        moe.update(
            {
                "model.moe.num_experts": num_experts,
                "model.moe.expert_hidden": hf["intermediate_size"],
                "model.moe.norm_topk": True,
                "model.moe.every_n_layers": 1,
            }
        )
    elif model_type == "olmoe":
        moe.update(
            {
                "model.moe.num_experts": num_experts,
                "model.moe.expert_hidden": hf["intermediate_size"],
                "model.moe.norm_topk": bool(hf.get("norm_topk_prob", False)),
                "model.moe.every_n_layers": 1,
            }
        )
    else:  # qwen2_moe, qwen3_moe
        if hf.get("shared_expert_intermediate_size"):
            raise refuse(
                f"shared_expert_intermediate_size={hf['shared_expert_intermediate_size']} (a shared expert "
                "behind a learned sigmoid gate; moe_dist's shared experts are ungated)"
            )
        every_n = _every_n_layers(hf, where)
        moe.update(
            {
                "model.moe.num_experts": num_experts,
                "model.moe.expert_hidden": hf["moe_intermediate_size"],
                "model.moe.norm_topk": bool(hf.get("norm_topk_prob", False)),
                "model.moe.every_n_layers": every_n,
            }
        )
        if every_n > 1:
            moe["model.ffn_hidden"] = hf["intermediate_size"]
    moe["model.moe.top_k"] = hf["num_experts_per_tok"]
    return {**out, **moe}


def _every_n_layers(hf: dict, where: str) -> int:
    """Qwen's MoE block placement (mlp_only_layers, decoder_sparse_step) as moe_dist's every_n_layers."""
    n_layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    moe_layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    for n in range(1, n_layers + 1):
        if moe_layers == list(range(0, n_layers, n)):
            return n
    raise ValueError(
        f"{where}: MoE blocks at layers {moe_layers} (mlp_only_layers, decoder_sparse_step) are not supported; "
        "moe_dist places them at every n-th layer starting with layer 0"
    )


def hydra_overrides(overrides: dict) -> str:
    """``{"model.dim": 32, "model.moe.norm_topk": True}`` → ``model.dim=32 model.moe.norm_topk=true``."""

    def value(v) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in overrides.items())


class _SafetensorsDir:
    """Tensors of a model directory (one file or an index of shards), read lazily by name and slice."""

    def __init__(self, path: Path):
        if (path / WEIGHTS_INDEX).is_file():
            weight_map = json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"]
            self.file_of = {k: path / v for k, v in weight_map.items()}
        elif (path / WEIGHTS_FILE).is_file():
            with safe_open(path / WEIGHTS_FILE, "pt") as f:
                self.file_of = dict.fromkeys(f.keys(), path / WEIGHTS_FILE)
        else:
            raise ValueError(f"model.init_from={str(path)!r}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        if key not in self.file_of:
            raise ValueError(f"model.init_from={str(self.path)!r}: tensor {key!r} is missing")
        with safe_open(self.file_of[key], "pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]


def _config_value(cfg: ModelConfig, dotted: str):
    if dotted == "model.n_kv_heads":  # None and n_heads are the same model
        return None if kv_heads(cfg) == cfg.n_heads else cfg.n_kv_heads
    if dotted == "model.head_dim":
        return None if head_dim(cfg) * cfg.n_heads == cfg.dim else cfg.head_dim
    value = cfg
    for part in dotted.split(".")[1:]:
        value = getattr(value, part)
    return value


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"tensor {name!r}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


class _ShardStaging:
    """engine=fsdp: parameters are DTensor shards, which the mappings cannot fill piecewise. Each one is staged
    on the host as the mappings need it (dense: the whole tensor; experts: this rank's experts, whole along the
    other dims), and its shard copied in once the last mapping writing it has run, then freed: at most a few
    whole tensors at a time, never the whole model."""

    def __init__(
        self, params: dict[str, torch.Tensor], offsets: dict[str, int], mappings: list[TensorMapping]
    ):
        self.params, self.offsets = params, offsets
        self.sharded = {k: local_shard(v) for k, v in params.items() if isinstance(v, DTensor)}
        self.pending = {k: sum(k in m.ours for m in mappings) for k in self.sharded}
        self.staged: dict[str, torch.Tensor] = {}

    def targets(self, mapping: TensorMapping) -> dict[str, torch.Tensor]:
        out = {}
        for key in mapping.ours:
            if key not in self.sharded:
                out[key] = self.params[key]
                continue
            if key not in self.staged:
                local, _ = self.sharded[key]
                shape = list(self.params[key].shape)
                if key in self.offsets:  # stacked experts: only the rows of this rank's experts
                    shape[0] = local.shape[0]
                self.staged[key] = torch.empty(shape, dtype=local.dtype)
            out[key] = self.staged[key]
        return out

    def done(self, mapping: TensorMapping) -> None:
        for key in mapping.ours:
            if key not in self.sharded:
                continue
            self.pending[key] -= 1
            if self.pending[key] == 0:
                local, offset = self.sharded[key]
                if key in self.offsets:  # dim 0 already holds this rank's experts only
                    offset = (0, *offset[1:])
                staged = self.staged.pop(key)
                local.copy_(staged[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))])


@torch.no_grad()
def init_from_hf(model: Transformer, path: str | Path, mesh: Mesh) -> None:
    """Loads a local Hugging Face directory into a built (and possibly EP-sharded) moe_dist model, in place.

    Every rank reads the dense tensors and only its own experts [expert_offset, expert_offset + L). The
    moe_dist config must match the HF config (ValueError listing every difference). No download, ever.
    """
    p = _local_dir(path)
    wanted = model_config_from_hf(p)
    cfg = model.cfg
    diffs = [
        f"{key}={_config_value(cfg, key)!r} but the Hugging Face model has {value!r}"
        for key, value in wanted.items()
        if _config_value(cfg, key) != value
    ]
    hf = _read_hf_config(p)
    sliding_window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if sliding_window is not None and sliding_window < cfg.seq_len:
        diffs.append(
            f"model.seq_len={cfg.seq_len} is longer than the model's sliding_window={sliding_window}"
        )
    if diffs:
        raise ValueError(
            f"model.init_from={str(path)!r} does not match this run's model config: {'; '.join(diffs)}. "
            f"Matching overrides: {hydra_overrides(wanted)}"
        )
    tensors = _SafetensorsDir(p)
    model_type = hf["model_type"]
    mappings = hf_tensor_mappings(cfg, model_type)
    if cfg.moe.num_experts and not all(m.hf in tensors for m in mappings if m.expert is not None):
        # transformers 5 in-memory names (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F])
        fused = hf_tensor_mappings(cfg, model_type, fused_experts=True)
        if all(m.hf in tensors for m in fused if ".experts." in m.hf):
            mappings = fused
    params = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    offsets = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            for w in ("w_gate_up", "w_down"):
                key = f"{name}.experts.{w}"
                if isinstance(params[key], DTensor):  # engine=fsdp: the global [E, ...] tensor's shard
                    offsets[key] = local_shard(params[key])[1][0]
                else:
                    assert module.experts.num_local_experts == module.cfg.num_experts // mesh.ep, (
                        "not sharded by mesh"
                    )
                    offsets[key] = module.experts.expert_offset
    covered = {key for m in mappings for key in m.ours}
    missing = [k for k in params if k not in covered and not k.endswith(("expert_bias", "noise_weight"))]
    assert not missing, f"no Hugging Face tensor maps to {missing}"
    staging = _ShardStaging(params, offsets, mappings)
    for mapping in mappings:
        mapping.load(tensors, staging.targets(mapping), offsets)
        staging.done(mapping)
    for layer in model.moe_layers():
        layer.router.expert_bias.zero_()
        if layer.router.noise_weight is not None:
            layer.router.noise_weight.zero_()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_dist.hf",
        description="Print the Hydra overrides matching a local Hugging Face model directory",
    )
    parser.add_argument("command", choices=("overrides",))
    parser.add_argument("path")
    args = parser.parse_args(argv)
    print(hydra_overrides(model_config_from_hf(args.path)))


if __name__ == "__main__":
    main()
