"""Process-group set-up and teardown: backend choice, device choice, rank helpers."""

from __future__ import annotations

import datetime
import json
import os

import torch
import torch.distributed as dist

from moe_dist.config import BACKENDS


def choose_device(
    *, device: str = "auto", backend: str = "auto", allow_gloo_on_cuda: bool = False
) -> tuple[str, str]:
    """(device type, backend) from ``trainer.device`` and ``parallel.backend``, checked before any process group
    exists: a ValueError names the key when they do not fit this machine or each other."""
    if backend not in BACKENDS:
        raise ValueError(f"parallel.backend={backend!r}: must be one of {BACKENDS}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("trainer.device='cuda': CUDA is not available here")
    device_type = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if backend == "auto":
        return device_type, "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        why = (
            "CUDA is not available here"
            if not cuda
            else f"trainer.device={device!r} keeps the model on the CPU"
        )
        raise ValueError(f"parallel.backend='nccl': needs CUDA tensors, but {why} (use gloo)")
    if backend == "gloo" and device_type == "cuda" and not allow_gloo_on_cuda:
        raise ValueError(
            f"parallel.backend='gloo' with trainer.device={device!r} on a machine with CUDA: the model would "
            "sit on the GPU and every collective would go through gloo's host copies. Use parallel.backend=nccl "
            "(or auto) for the GPUs, trainer.device=cpu to train on the CPU, or parallel.allow_gloo_on_cuda=true "
            "to run GPU tensors through gloo anyway (debugging)"
        )
    return device_type, backend


def local_cuda_device() -> torch.device:
    """This rank's GPU: LOCAL_RANK modulo the visible GPUs, so that a scheduler exposing one GPU per task
    (CUDA_VISIBLE_DEVICES per rank, LOCAL_RANK up to the node's task count) gets cuda:0 everywhere."""
    count = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local_world > count > 1:
        raise ValueError(
            f"LOCAL_WORLD_SIZE={local_world} ranks on this node but {count} visible GPUs: NCCL needs a GPU of "
            "its own per rank (start one rank per GPU, or expose one GPU per task)"
        )
    return torch.device("cuda", local_rank % count)


def env_world_size() -> int:
    """World size as launched (torchrun sets WORLD_SIZE; plain srun does not), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


DEFAULT_TIMEOUT_S = {"nccl": 600.0, "gloo": 300.0}


def collective_timeout_s(backend: str, timeout_s: float | None) -> float:
    """``parallel.timeout_s``, or the default of the (resolved) backend."""
    return timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S[backend]


def init_distributed(
    *,
    device_type: str = "cpu",
    backend: str = "gloo",
    timeout_s: float | None = None,
    single_rank_group: bool = False,
) -> torch.device:
    """Initialises the default process group when launched with several ranks; returns this rank's device.

    ``device_type`` and ``backend`` come from ``choose_device``. A world of 1 started without torchrun gets no
    process group at all (every collective is skipped), unless ``single_rank_group``: then a one-rank group on
    an in-memory store (no rendezvous, no port). A collective that waits longer than the timeout raises
    instead of hanging (NCCL: the watchdog aborts the communicator; gloo: the wait times out).
    """
    timeout_s = collective_timeout_s(backend, timeout_s)
    world = env_world_size()
    device = local_cuda_device() if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun can hand a restarted worker group the store of the failed attempt; without a prefix per
        # attempt, new ranks read the gloo/NCCL addresses the dead ranks published and hang connecting.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"moe_dist/attempt_{attempt}", store)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs
        )
    elif single_rank_group and not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
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


def _json_device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _decode(buffer: torch.Tensor):
    return json.loads(buffer.cpu().numpy().tobytes().decode())


def broadcast_json(value, *, group: dist.ProcessGroup | None = None):
    """The value of ``group``'s first rank (JSON-serialisable) on every rank of it (no pickle on the wire)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    device = _json_device(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    is_src = dist.get_rank() == src
    payload = json.dumps(value).encode() if is_src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if is_src:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=src, group=group)
    return _decode(buffer)


def all_gather_json(value, *, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's JSON-serialisable ``value``, in rank order, on every rank of ``group`` (no pickle)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [value]
    device, world = _json_device(group), dist.get_world_size(group)
    payload = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device), group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    buffers = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    return [_decode(b[: int(s.item())]) for b, s in zip(buffers, sizes)]
