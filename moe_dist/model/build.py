"""The one place a model is built: from a config, a moe_dist checkpoint (to resume, fine-tune or upcycle) or a
Hugging Face directory.

Every path is the same four moves: the single-device ``Transformer`` on the meta device (in the precision's
parameter dtype) → sharded over the mesh (``parallelize_moe``; activation checkpointing hooks; with
engine=fsdp, ``parallelize_fsdp``) → materialised on the device (only the shards) → initialised (seeded per
parameter and per global expert, then overwritten by what it starts from). The trainer, generation, export
and the scripts call it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from moe_dist.checkpoint import (
    META_FILE,
    SafeFileSystemReader,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    model_state,
    read_into,
    read_meta,
    resolve_checkpoint,
    verify,
)
from moe_dist.config import Config, ModelConfig, MoEConfig, TrainerConfig
from moe_dist.model.transformer import Transformer, local_shard
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.apply import apply_activation_checkpointing, parallelize_fsdp, parallelize_moe
from moe_dist.parallel.mesh import Mesh
from moe_dist.precision import param_dtype, resolve_precision


def build_model(cfg: Config, mesh: Mesh, device: torch.device) -> Transformer:
    """Single-device model on the meta device → sharded by the mesh (``trainer.freeze`` applied before FSDP2
    sees the parameters) → materialised → seeded init (→ the weights of ``model.init_from`` when set)."""
    return materialise_model(sharded_meta_model(cfg, mesh, device), cfg, mesh, device)


def sharded_meta_model(cfg: Config, mesh: Mesh, device: torch.device) -> Transformer:
    """The first half of ``build_model``: the model on the meta device, sharded over the mesh, frozen where
    ``trainer.freeze`` says, with its activation checkpointing hooks (and FSDP2 units for engine=fsdp).

    The planner (moe_dist.plan) calls the two halves apart: this one outside its FakeTensorMode (a module
    built on meta inside it cannot be moved to a device: its parameters would have to be swapped).
    """
    with torch.device("meta"):
        model = Transformer(cfg.model).to(param_dtype(cfg.trainer.precision))
    parallelize_moe(model, mesh)
    freeze_parameters(model, cfg.trainer.freeze)
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if cfg.trainer.compile:
        model.compile_blocks()  # compiled at the first forward; before FSDP wraps the blocks (torchtitan's order)
    if cfg.engine.name == "fsdp":
        bf16 = resolve_precision(cfg.trainer.precision, device) == "bf16"
        e = cfg.engine
        parallelize_fsdp(
            model, mesh, bf16=bf16, reshard_after_forward=e.reshard_after_forward, prefetch=e.prefetch
        )
    return model


def materialise_model(
    model: Transformer, cfg: Config, mesh: Mesh, device: torch.device, *, init: bool = True
) -> Transformer:
    """The second half of ``build_model``: on the device, seeded init, then ``model.init_from`` if set.
    ``init=False`` leaves the values undefined (the planner's fake tensors have none); the frozen parameters
    stay frozen either way (``sharded_meta_model`` froze them)."""
    model.to_empty(device=device)
    if not init:
        return model
    model.init_weights(cfg.trainer.seed)
    if cfg.model.init_from:
        if init_from_kind(cfg.model.init_from) == "hf":
            from moe_dist.hf import init_from_hf

            init_from_hf(model, cfg.model.init_from, mesh)
        else:
            init_from_checkpoint(model, cfg.model.init_from, mesh)
    return model


# ------------------------------------------------------------------------------------ starting from weights


def init_from_kind(path: str) -> str:
    """ "checkpoint" (a moe_dist checkpoint or run directory) or "hf" (a local Hugging Face directory)."""
    p = Path(path).expanduser()
    if (p / META_FILE).is_file() or (p.is_dir() and latest_checkpoint(p) is not None):
        return "checkpoint"
    if (p / "config.json").is_file():
        return "hf"
    raise ValueError(
        f"model.init_from={path!r}: neither a moe_dist checkpoint or run directory (meta.json, checkpoints/) "
        "nor a local Hugging Face model directory (config.json); hub downloads are never attempted"
    )


def validate_init_from(cfg: Config) -> None:
    """Checks ``model.init_from`` against the run's model before any collective: what it is, and that its
    weights fit (the same structure, or a dense model to upcycle into this MoE)."""
    if not cfg.model.init_from:
        return
    if init_from_kind(cfg.model.init_from) == "hf":
        return  # a Hugging Face directory is checked against the config by init_from_hf
    path = resolve_checkpoint(Path(cfg.model.init_from).expanduser())
    saved = model_config_from_meta(read_meta(path))
    if is_upcycling(saved, cfg.model):
        _check_upcycling(saved, cfg.model, where=f"model.init_from={cfg.model.init_from!r}")
        return
    try:
        check_compatible(dataclasses.asdict(saved), dataclasses.asdict(cfg.model), path=path)
    except ValueError as err:
        raise ValueError(f"model.init_from={cfg.model.init_from!r}: {err}") from err


def is_upcycling(saved: ModelConfig, model: ModelConfig) -> bool:
    """A dense checkpoint into an MoE model: sparse upcycling (Komatsuzaki et al., 2022)."""
    return saved.moe.num_experts == 0 and model.moe.num_experts > 0


def _check_upcycling(saved: ModelConfig, model: ModelConfig, *, where: str) -> None:
    diffs = [
        f"model.{key}={getattr(model, key)!r} but the dense checkpoint has {getattr(saved, key)!r}"
        for key in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "qk_norm",
            "tie_embeddings",
        )
        if getattr(model, key) != getattr(saved, key)
    ]
    if model.moe.expert_hidden != saved.ffn_hidden:
        diffs.append(
            f"model.moe.expert_hidden={model.moe.expert_hidden} must equal the dense model's ffn_hidden="
            f"{saved.ffn_hidden} (every expert starts as a copy of the dense FFN)"
        )
    if model.moe.every_n_layers > 1 and model.ffn_hidden != saved.ffn_hidden:
        diffs.append(f"model.ffn_hidden={model.ffn_hidden} but the dense checkpoint has {saved.ffn_hidden}")
    if model.moe.num_shared_experts:
        diffs.append(
            f"model.moe.num_shared_experts={model.moe.num_shared_experts}: must be 0 (a shared expert beside "
            "copies of the dense FFN would double its output)"
        )
    if diffs:
        raise ValueError(
            f"{where}: cannot upcycle this dense checkpoint into the run's MoE: {'; '.join(diffs)}"
        )


@torch.no_grad()
def init_from_checkpoint(model: Transformer, path: str | os.PathLike, mesh: Mesh) -> None:
    """Collective. The weights of a moe_dist checkpoint (or a run's newest) into a freshly built model, saved
    at any world size, EP degree and engine; no optimizer state, step or data position comes along.

    A dense checkpoint into an MoE model is upcycled: every expert of an MoE block starts as a copy of that
    block's dense FFN and the router keeps its fresh seeded init. With renormalised top-k weights (or the
    soft router) the gate weights of a token sum to 1, so the MoE computes the dense function at step 0.
    """
    ckpt = resolve_checkpoint(Path(path).expanduser())
    problem = verify(ckpt, group=mesh.world_group)  # every rank hashes a share of the files
    if problem:
        raise ValueError(f"model.init_from={str(path)!r}: {problem}")
    saved = model_config_from_meta(read_meta(ckpt))
    if not is_upcycling(saved, model.cfg):
        load_checkpoint(ckpt, state=model_state(model, mesh), model_cfg=dataclasses.asdict(model.cfg))
        return
    _check_upcycling(saved, model.cfg, where=f"model.init_from={str(path)!r}")
    moe = model.cfg.moe
    if not (moe.norm_topk or moe.router == "soft") or moe.capacity_factor is not None:
        warnings.warn(
            f"model.init_from={str(path)!r}: upcycled with model.moe.norm_topk={moe.norm_topk} and "
            f"capacity_factor={moe.capacity_factor}: the gate weights of a token need not sum to 1 (or copies "
            "are dropped), so the MoE does not start from the dense model's function",
            stacklevel=2,
        )
    live = model.state_dict(keep_vars=True)
    tensors = {f"model.{k}": v.detach() for k, v in live.items() if ".ffn." not in k or ".ffn.w_" in k}
    moe_blocks = [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MoELayer)]
    F, D = saved.ffn_hidden, saved.dim
    like = local_shard(model.tok_embeddings.weight)[0]
    for i in moe_blocks:
        for name, shape in (("w_gate", (F, D)), ("w_up", (F, D)), ("w_down", (D, F))):
            tensors[f"model.layers.{i}.ffn.{name}.weight"] = like.new_empty(shape)
    read_into(SafeFileSystemReader(ckpt), tensors)
    for i in moe_blocks:
        experts = model.layers[i].ffn.experts
        dense = {n: tensors[f"model.layers.{i}.ffn.{n}.weight"] for n in ("w_gate", "w_up", "w_down")}
        expert_copies = {
            "w_gate_up": torch.cat([dense["w_gate"].t(), dense["w_up"].t()], dim=1),  # [D, 2F]
            "w_down": dense["w_down"].t(),  # [F, D]
        }
        for name, copy in expert_copies.items():
            # Every local expert gets the same copy. engine=fsdp: this rank's shard of the [E, ...] DTensor,
            # split on the expert dim or on dim 1.
            local, offset = local_shard(getattr(experts, name))
            local.copy_(
                copy[tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))].expand_as(local)
            )


def freeze_parameters(model: Transformer, groups: list[str]) -> None:
    """``trainer.freeze``: the named groups keep their weights (no gradient, no optimizer state).

    router: router weights (and the aux-loss-free bias stops moving); embeddings: token embeddings and LM head;
    experts: the routed experts; dense: everything else (attention, norms, dense FFNs, shared experts).
    """
    if not groups:
        return
    for name, p in model.named_parameters():
        if ".router." in name:
            group = "router"
        elif name.startswith(("tok_embeddings.", "output.")):
            group = "embeddings"
        elif ".experts." in name and ".shared_experts." not in name:
            group = "experts"
        else:
            group = "dense"
        if group in groups:
            p.requires_grad_(False)
    if "router" in groups:
        for layer in model.moe_layers():
            layer.router.bias_update_rate = 0.0
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"trainer.freeze={list(groups)}: leaves no parameter of this model to train")


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with (keys this version does not know are ignored)."""
    saved = dict(meta["model"])
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    moe = MoEConfig(**{k: v for k, v in saved.pop("moe", {}).items() if k in moe_fields})
    return ModelConfig(**{k: v for k, v in saved.items() if k in model_fields}, moe=moe)


def load_model(
    path: str | os.PathLike, *, mesh: Mesh, device: torch.device, seq_len: int | None = None
) -> tuple[Transformer, dict]:
    """Collective. Builds the model as training does (sharded over ``mesh``), loads the checkpoint, eval mode.

    ``path`` is a checkpoint or a run directory (its newest checkpoint). Returns (model, meta). Any
    (world, ep) can load a checkpoint saved at any other. ``seq_len`` sets another context length (RoPE
    positions are computed, not stored).
    """
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    mcfg = dataclasses.replace(model_config_from_meta(meta), init_from=None)
    if seq_len is not None:
        mcfg = dataclasses.replace(mcfg, seq_len=seq_len)
    model = build_model(Config(model=mcfg, trainer=TrainerConfig(seed=meta.get("seed", 0))), mesh, device)
    load_checkpoint(path, state=model_state(model, mesh), model_cfg=dataclasses.asdict(mcfg))
    return model.eval(), meta
