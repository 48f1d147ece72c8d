"""Process-group set-up and teardown: backend choice, device choice, rank helpers."""

from __future__ import annotations

import datetime
import json
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
    """World size as launched (torchrun sets WORLD_SIZE; plain srun does not), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


DEFAULT_TIMEOUT_S = {"nccl": 600.0, "gloo": 300.0}


def collective_timeout_s(backend: str, timeout_s: float | None) -> float:
    return timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S[resolve_backend(backend)]


def init_distributed(
    *, backend: str = "auto", timeout_s: float | None = None, single_rank_group: bool = False
) -> torch.device:
    """Initialises the default process group when launched with several ranks; returns this rank's device.

    A world of 1 started without torchrun gets no process group at all (every collective is skipped), unless
    ``single_rank_group``: then a one-rank group on an in-memory store (no rendezvous, no port).
    A collective that waits longer than the timeout raises instead of hanging (NCCL: the watchdog aborts
    the communicator; gloo: the wait times out).
    """
    backend = resolve_backend(backend)
    timeout_s = collective_timeout_s(backend, timeout_s)
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun can hand a restarted worker group the store of the failed attempt; without a prefix per
        # attempt, new ranks read the gloo/NCCL addresses the dead ranks published and hang connecting.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"moe_dist/attempt_{attempt}", store)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs
        )
    elif single_rank_group and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
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


def broadcast_json(value, *, device: torch.device | None = None):
    """Rank 0's JSON-serialisable ``value`` on every rank (no pickle on the wire)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = device or (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    device = device or torch.device("cpu")
    payload = json.dumps(value).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()).decode())
