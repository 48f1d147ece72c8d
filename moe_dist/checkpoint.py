"""Reshardable, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``<out_dir>/checkpoints/step_<N>/`` holds DCP shards, DCP's ``.metadata`` and our ``meta.json``.
Experts are saved as DTensors sharded over the mesh's ``ep`` axis, so the files hold one *global* expert
layout and any (world, ep) can load them. A save is written to ``.tmp_step_<N>`` and renamed only after
every rank has finished: a crash mid-save never touches the newest complete checkpoint, and directories
without the rename are ignored. Loading never unpickles arbitrary objects (see ``_MetadataUnpickler``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_dist.moe.experts import GroupedExperts
from moe_dist.parallel.mesh import Mesh

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Model fields that change the parameter shapes: a checkpoint must agree on all of them.
STRUCTURAL_KEYS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "ffn_hidden",
    "moe.num_experts",
    "moe.expert_hidden",
    "moe.num_shared_experts",
    "moe.every_n_layers",
    "moe.noisy_gate",
    "n_kv_heads",
    "head_dim",
    "qk_norm",
    "tie_embeddings",
)
# Values of structural keys that checkpoints written before the key existed had implicitly.
STRUCTURAL_DEFAULTS = {"n_kv_heads": None, "head_dim": None, "qk_norm": "none", "tie_embeddings": False}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its index with pickle; only DCP's own metadata classes and torch scalars may appear."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    _ALLOWED = frozenset(
        {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch.serialization", "_get_layout"),
            ("torch", "Size"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str):
        if module in self._ALLOWED_MODULES or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with open(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS


def complete_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(out_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / META_FILE).is_file() and (child / ".metadata").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def validate_resume(resume: str) -> None:
    """``trainer.resume`` names "auto", "none" or a complete checkpoint directory; checked before any collective."""
    if resume not in ("auto", "none") and not (Path(resume) / META_FILE).is_file():
        raise ValueError(
            f"trainer.resume={resume!r}: must be auto, none, or a complete checkpoint directory "
            "(.../checkpoints/step_<N>)"
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (``.../checkpoints/step_N``), or a run directory: its newest checkpoint."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    newest = latest_checkpoint(path) if path.is_dir() else None
    if newest is None:
        raise ValueError(
            f"checkpoint={str(path)!r}: neither a checkpoint (no {META_FILE}) nor a run directory"
        )
    return newest


def select_checkpoint(resume: str, out_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from (verified against its digests) and warnings about skipped ones.

    ``auto``: the newest complete checkpoint in out_dir whose files are intact; a corrupted newer one is
    skipped with a warning rather than loaded. An explicit path that fails verification is an error.
    """
    if resume == "none":
        return None, []
    if resume != "auto":
        problem = verify(resume)
        if problem:
            raise ValueError(f"trainer.resume={resume!r}: {problem}")
        return str(resume), []
    warnings = []
    for step, path in reversed(complete_checkpoints(out_dir)):
        problem = verify(path)
        if problem is None:
            return str(path), warnings
        warnings.append(f"warning: skipping checkpoint step {step} at {path}: {problem}")
    return None, warnings


def _expert_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def _global_view(t: torch.Tensor, *, is_expert: bool, mesh: Mesh) -> torch.Tensor:
    """Experts as DTensors over (edp, ep): replicated over edp, sharded on dim 0 over ep."""
    if not is_expert or mesh.device_mesh is None or mesh.ep == 1:
        return t
    return DTensor.from_local(t, mesh.device_mesh, [Replicate(), Shard(0)], run_check=False)


def _state_dict(model: nn.Module, optimizer_slots: dict | None, mesh: Mesh) -> dict:
    """Flat state whose tensors alias the live ones (model) or the engine's slots, so dcp.load fills them."""
    experts = _expert_param_ids(model)
    state: dict[str, Any] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        state[f"model.{name}"] = _global_view(t.detach(), is_expert=id(t) in experts, mesh=mesh)
    if optimizer_slots is not None:
        params = dict(model.named_parameters())
        for name, slots in optimizer_slots.items():
            for key, value in slots.items():
                is_expert = id(params[name]) in experts and value.dim() > 0
                state[f"optim.{name}.{key}"] = _global_view(value, is_expert=is_expert, mesh=mesh)
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    out_dir: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    optimizer_slots: dict | None,
    mesh: Mesh,
    meta: dict,
    keep: int,
) -> Path:
    """Collective: every rank must call it. Returns the final directory."""
    root = checkpoints_root(out_dir)
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if mesh.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_state_dict(model, optimizer_slots, mesh), storage_writer=FileSystemWriter(tmp))
    _barrier()
    if mesh.rank == 0:
        meta = {**meta, "step": step, "world_size": mesh.world_size, "ep": mesh.ep, "sha256": _digests(tmp)}
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. after a restart): replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digests(directory: Path) -> dict[str, str]:
    out = {}
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name != META_FILE:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            out[file.name] = digest.hexdigest()
    return out


def verify(path: str | os.PathLike) -> str | None:
    """None when every file matches the digest recorded at save time, else what is wrong."""
    path = Path(path)
    try:
        recorded = read_meta(path).get("sha256")
    except (ValueError, json.JSONDecodeError) as err:
        return f"unreadable {META_FILE}: {err}"
    if recorded is None:
        return f"{META_FILE} has no file digests"
    actual = _digests(path)
    for name, digest in recorded.items():
        if name not in actual:
            return f"file {name} is missing"
        if actual[name] != digest:
            return f"file {name} does not match its sha256 digest (corrupted)"
    return None


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"trainer.resume={str(path)!r}: not a complete checkpoint (no {META_FILE})")
    with open(meta_path) as f:
        return json.load(f)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _structure(model_cfg: dict) -> dict:
    """Flat model config with implicit values made explicit (n_kv_heads None = n_heads, ...)."""
    flat = {**STRUCTURAL_DEFAULTS, **_flatten(model_cfg)}
    if flat["n_kv_heads"] is None:
        flat["n_kv_heads"] = flat.get("n_heads")
    if flat["head_dim"] is None and flat.get("n_heads"):
        flat["head_dim"] = flat["dim"] // flat["n_heads"]
    return flat


def check_compatible(saved_model_cfg: dict, model_cfg: dict, *, path: str | os.PathLike) -> None:
    saved, current = _structure(saved_model_cfg), _structure(model_cfg)
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}"
        for k in STRUCTURAL_KEYS
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: " + "; ".join(diffs))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer_slots: dict | None,
    mesh: Mesh,
    model_cfg: dict,
) -> dict:
    """Collective. Restores the model, and fills ``optimizer_slots`` (as from ``engine.optimizer_slots()``),
    in place from a checkpoint of any (world, ep) layout and either engine; returns meta."""
    meta = read_meta(path)
    check_compatible(meta["model"], model_cfg, path=path)
    dcp.load(_state_dict(model, optimizer_slots, mesh), storage_reader=SafeFileSystemReader(path))
    return meta


def load_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Collective. Fills ``tensors`` (checkpoint keys such as ``model.layers.0.ffn.w_up.weight``) in place from
    a checkpoint, whatever model they belong to (sparse upcycling reads dense FFNs into an MoE model)."""
    dcp.load(tensors, storage_reader=SafeFileSystemReader(path))
