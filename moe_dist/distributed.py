"""Process-group set-up and teardown: backend choice, device choice, rank helpers."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from moe_dist.config import BACKENDS


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"parallel.backend={backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend='nccl': needs CUDA, which is not available here (use gloo)")
    return backend


def env_world_size() -> int:
    """World size as launched (torchrun / srun set WORLD_SIZE), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(*, backend: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Initialises the default process group when launched with several ranks; returns this rank's device.

    A world of 1 started without torchrun gets no process group at all: every collective is skipped.
    """
    backend = resolve_backend(backend)
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0
