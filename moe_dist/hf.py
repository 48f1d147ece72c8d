"""Hugging Face interop: export a checkpoint as a transformers model directory; start training from one.

Export picks the transformers architecture that computes exactly what the moe_dist model computes:

    Mixtral            softmax top-k with renormalised weights (or the soft mixture: top-k = all experts,
                       router weights / temperature), no shared experts, an MoE FFN in every block
    GraniteMoeShared   the same routing plus always-on (ungated) shared experts (multipliers set to 1)
    Qwen2-MoE          softmax top-k with or without renormalisation, dense FFN blocks at any positions
                       (``mlp_only_layers``), no shared experts (its sigmoid-gated shared expert has width 0)
    GLM-4-MoE          sigmoid router whose selection bias is ``e_score_correction_bias`` (DeepSeek-V3
                       routing without MLA), ungated shared experts; n_group = 1, routed scaling 1, full RoPE
    Llama              dense models (model.moe.num_experts = 0)

and refuses, with a ValueError naming the feature, a model none of them computes. The files use the
names and layouts that ``save_pretrained`` writes (per expert, ``experts.{e}.w1``..., except Granite's
stacked ``input_linear``), hold the *global* experts whatever EP the checkpoint was saved at, and load
with ``AutoModelForCausalLM.from_pretrained``.

Import (``init_from_hf``) reads local Mixtral directories (config.json + safetensors), each rank only its
expert shard; it never downloads. Only json and safetensors are needed here, not transformers.

Legend: E experts, L local experts, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_dist.config import ModelConfig
from moe_dist.model.transformer import Transformer
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.mesh import Mesh

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
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
        "num_key_value_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": None,  # byte-level vocabularies have no special tokens
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    top_k = moe.num_experts if moe.router == "soft" else moe.top_k
    if model_type == "llama":
        out.update(intermediate_size=cfg.ffn_hidden, attention_bias=False, mlp_bias=False)
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
            attention_bias=False,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            attention_multiplier=(cfg.dim // cfg.n_heads) ** -0.5,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
    elif model_type == "qwen2_moe":
        out.update(
            intermediate_size=cfg.ffn_hidden,
            moe_intermediate_size=moe.expert_hidden,
            shared_expert_intermediate_size=0,
            num_experts=moe.num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=moe.norm_topk and moe.router != "soft",
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.n_layers) if i % moe.every_n_layers != 0],
            qkv_bias=False,
            use_sliding_window=False,
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
            use_qk_norm=False,
            attention_bias=False,
            num_nextn_predict_layers=0,
        )
    return out


def hf_state_dict(
    cfg: ModelConfig, state: dict[str, torch.Tensor], model_type: str
) -> dict[str, torch.Tensor]:
    """moe_dist global state dict → the tensors of ``model_type``'s files (names and layouts of save_pretrained)."""
    moe = cfg.moe
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        out[f"{hf}.input_layernorm.weight"] = state[f"{ours}.attn_norm.weight"]
        out[f"{hf}.post_attention_layernorm.weight"] = state[f"{ours}.ffn_norm.weight"]
        for proj in "qkvo":
            out[f"{hf}.self_attn.{proj}_proj.weight"] = state[f"{ours}.attn.w{proj}.weight"]
        ffn = f"{ours}.ffn"
        if f"{ffn}.w_gate.weight" in state:  # a dense block: llama / qwen2_moe's mlp_only_layers
            for name in ("gate", "up", "down"):
                out[f"{hf}.mlp.{name}_proj.weight"] = state[f"{ffn}.w_{name}.weight"]
            continue
        router_E_D = state[f"{ffn}.router.weight"]
        if moe.router == "soft":  # softmax(logits / temperature) == softmax over logits of W / temperature
            router_E_D = router_E_D / moe.temperature
        w_gate_up_EDF2, w_down_EFD = state[f"{ffn}.experts.w_gate_up"], state[f"{ffn}.experts.w_down"]
        F = w_down_EFD.shape[1]
        gate_EFD = w_gate_up_EDF2[:, :, :F].transpose(1, 2)
        up_EFD = w_gate_up_EDF2[:, :, F:].transpose(1, 2)
        down_EDF = w_down_EFD.transpose(1, 2)
        if model_type == "granitemoeshared":
            moe_prefix = f"{hf}.block_sparse_moe"
            out[f"{moe_prefix}.router.layer.weight"] = router_E_D
            out[f"{moe_prefix}.input_linear.weight"] = torch.cat([gate_EFD, up_EFD], dim=1)
            out[f"{moe_prefix}.output_linear.weight"] = down_EDF
            if moe.num_shared_experts:
                out[f"{hf}.shared_mlp.input_linear.weight"] = torch.cat(
                    [state[f"{ffn}.shared_experts.w_gate.weight"], state[f"{ffn}.shared_experts.w_up.weight"]]
                )
                out[f"{hf}.shared_mlp.output_linear.weight"] = state[f"{ffn}.shared_experts.w_down.weight"]
            continue
        if model_type == "mixtral":
            prefix, names = f"{hf}.block_sparse_moe", ("w1", "w3", "w2")
        else:
            prefix, names = f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj")
        out[f"{prefix}.gate.weight"] = router_E_D
        for e in range(moe.num_experts):
            for name, w in zip(names, (gate_EFD[e], up_EFD[e], down_EDF[e])):
                out[f"{prefix}.experts.{e}.{name}.weight"] = w
        if model_type == "qwen2_moe":  # width-0 shared expert: its gated output is exactly 0
            D = cfg.dim
            out[f"{prefix}.shared_expert.gate_proj.weight"] = router_E_D.new_zeros(0, D)
            out[f"{prefix}.shared_expert.up_proj.weight"] = router_E_D.new_zeros(0, D)
            out[f"{prefix}.shared_expert.down_proj.weight"] = router_E_D.new_zeros(D, 0)
            out[f"{prefix}.shared_expert_gate.weight"] = router_E_D.new_zeros(1, D)
        elif model_type == "glm4_moe":
            out[f"{prefix}.gate.e_score_correction_bias"] = state[f"{ffn}.router.expert_bias"].float()
            width = moe.num_shared_experts * moe.expert_hidden
            for name, shape in (
                ("gate", (width, cfg.dim)),
                ("up", (width, cfg.dim)),
                ("down", (cfg.dim, width)),
            ):
                key = f"{ffn}.shared_experts.w_{name}.weight"
                out[f"{prefix}.shared_experts.{name}_proj.weight"] = (
                    state[key] if key in state else router_E_D.new_zeros(shape)
                )
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
        k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)).contiguous()
        for k, v in hf_state_dict(cfg, state, model_type).items()
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


def model_config_from_hf(path: str | Path) -> dict:
    """Overrides (``{"model.dim": 32, ...}``) that make a moe_dist model match a local Mixtral directory.

    ``hydra_overrides`` gives the command-line form (``python -m moe_dist.hf overrides DIR`` prints it).
    Raises ValueError for a non-Mixtral model or a Mixtral feature moe_dist lacks (grouped-query
    attention, RoPE scaling, ...). model.seq_len is left to the run.
    """
    p = _local_dir(path)
    hf = _read_hf_config(p)
    where = f"model.init_from={str(path)!r}"
    if hf.get("model_type") != "mixtral":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not supported; only 'mixtral' is")
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ValueError(
            f"{where}: num_key_value_heads={kv_heads} != num_attention_heads={heads}: grouped-query "
            "attention is not supported (moe_dist attention has as many key/value heads as query heads)"
        )
    if hf.get("head_dim") not in (None, dim // heads):
        raise ValueError(
            f"{where}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU experts use silu)"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))  # 1e6: transformers' Mixtral default
    return {
        "model.vocab_size": hf["vocab_size"],
        "model.dim": dim,
        "model.n_layers": hf["num_hidden_layers"],
        "model.n_heads": heads,
        "model.rope_theta": float(rope_theta),
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
        "model.moe.num_experts": hf["num_local_experts"],
        "model.moe.top_k": hf["num_experts_per_tok"],
        "model.moe.expert_hidden": hf["intermediate_size"],
        "model.moe.router": "softmax",
        "model.moe.norm_topk": True,
        "model.moe.num_shared_experts": 0,
        "model.moe.every_n_layers": 1,
    }


def hydra_overrides(overrides: dict) -> str:
    """``{"model.dim": 32, "model.moe.norm_topk": True}`` → ``model.dim=32 model.moe.norm_topk=true``."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


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
    value = cfg
    for part in dotted.split(".")[1:]:
        value = getattr(value, part)
    return value


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"tensor {name!r}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


@torch.no_grad()
def init_from_hf(model: Transformer, path: str | Path, mesh: Mesh) -> None:
    """Loads a local Mixtral directory into a built (and possibly EP-sharded) moe_dist model, in place.

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
    sliding_window = _read_hf_config(p).get("sliding_window")
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
    tied = _read_hf_config(p).get("tie_word_embeddings", False) and "lm_head.weight" not in tensors
    _copy(model.tok_embeddings.weight, tensors.get("model.embed_tokens.weight"), "model.embed_tokens.weight")
    _copy(model.norm.weight, tensors.get("model.norm.weight"), "model.norm.weight")
    lm_head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    _copy(model.output.weight, tensors.get(lm_head), lm_head)
    for i, block in enumerate(model.layers):
        hf = f"model.layers.{i}"
        for ours, key in (
            (block.attn_norm.weight, f"{hf}.input_layernorm.weight"),
            (block.ffn_norm.weight, f"{hf}.post_attention_layernorm.weight"),
            (block.attn.wq.weight, f"{hf}.self_attn.q_proj.weight"),
            (block.attn.wk.weight, f"{hf}.self_attn.k_proj.weight"),
            (block.attn.wv.weight, f"{hf}.self_attn.v_proj.weight"),
            (block.attn.wo.weight, f"{hf}.self_attn.o_proj.weight"),
        ):
            _copy(ours, tensors.get(key), key)
        layer = block.ffn
        assert isinstance(layer, MoELayer)
        _load_mixtral_experts(layer, tensors, hf, mesh)


def _load_mixtral_experts(layer: MoELayer, tensors: _SafetensorsDir, hf: str, mesh: Mesh) -> None:
    experts = layer.experts
    num_local, first = experts.num_local_experts, experts.expert_offset
    assert num_local == layer.cfg.num_experts // mesh.ep, "the model is not sharded over this mesh"
    # Files from save_pretrained / the Hub use block_sparse_moe.experts.{e}.w1/w3/w2 ([F, D], [F, D], [D, F]);
    # transformers 5 in-memory names (mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]) are read too.
    prefix = f"{hf}.block_sparse_moe" if f"{hf}.block_sparse_moe.gate.weight" in tensors else f"{hf}.mlp"
    _copy(layer.router.weight, tensors.get(f"{prefix}.gate.weight"), f"{prefix}.gate.weight")
    layer.router.expert_bias.zero_()
    if layer.router.noise_weight is not None:
        layer.router.noise_weight.zero_()
    F = experts.hidden
    w_gate_up_LDF2, w_down_LFD = experts.w_gate_up, experts.w_down
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in tensors:
        rows = slice(first, first + num_local)
        _copy(w_gate_up_LDF2, tensors.get(fused, rows).transpose(1, 2), fused)
        _copy(
            w_down_LFD,
            tensors.get(f"{prefix}.experts.down_proj", rows).transpose(1, 2),
            f"{prefix}.down_proj",
        )
        return
    for local in range(num_local):
        e = f"{prefix}.experts.{first + local}"
        _copy(w_gate_up_LDF2[local, :, :F], tensors.get(f"{e}.w1.weight").t(), f"{e}.w1.weight")
        _copy(w_gate_up_LDF2[local, :, F:], tensors.get(f"{e}.w3.weight").t(), f"{e}.w3.weight")
        _copy(w_down_LFD[local], tensors.get(f"{e}.w2.weight").t(), f"{e}.w2.weight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_dist.hf",
        description="Print the Hydra overrides matching a local Mixtral directory",
    )
    parser.add_argument("command", choices=("overrides",))
    parser.add_argument("path")
    args = parser.parse_args(argv)
    print(hydra_overrides(model_config_from_hf(args.path)))


if __name__ == "__main__":
    main()
