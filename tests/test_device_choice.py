"""Device and backend choice (trainer.device, parallel.backend) on machines with and without CUDA, and the
GPU of each rank: pure logic, CUDA's presence and GPU count patched."""

from __future__ import annotations

import pytest
import torch

from moe_dist.distributed import choose_device, local_cuda_device


@pytest.fixture
def gpus(monkeypatch):
    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return set_count


@pytest.mark.parametrize(
    ("count", "device", "backend", "allow", "expected"),
    [
        (0, "auto", "auto", False, ("cpu", "gloo")),
        (0, "cpu", "gloo", False, ("cpu", "gloo")),
        (8, "auto", "auto", False, ("cuda", "nccl")),
        (8, "cuda", "nccl", False, ("cuda", "nccl")),
        (8, "cpu", "auto", False, ("cpu", "gloo")),  # an explicit CPU run on a GPU machine stays on gloo
        (8, "cpu", "gloo", False, ("cpu", "gloo")),
        (8, "auto", "gloo", True, ("cuda", "gloo")),  # asked for explicitly
    ],
)
def test_device_and_backend_that_fit(gpus, count, device, backend, allow, expected):
    gpus(count)
    assert choose_device(device=device, backend=backend, allow_gloo_on_cuda=allow) == expected


@pytest.mark.parametrize(
    ("count", "device", "backend", "message"),
    [
        (8, "auto", "gloo", r"^parallel.backend='gloo' with trainer.device='auto' on a machine with CUDA: .*"
                            r"parallel.allow_gloo_on_cuda=true"),
        (8, "cuda", "gloo", r"^parallel.backend='gloo' with trainer.device='cuda'"),
        (0, "auto", "nccl", r"^parallel.backend='nccl': needs CUDA tensors, but CUDA is not available here"),
        (8, "cpu", "nccl", r"^parallel.backend='nccl': needs CUDA tensors, but trainer.device='cpu'"),
        (0, "cuda", "auto", r"^trainer.device='cuda': CUDA is not available here"),
        (0, "auto", "mpi", r"^parallel.backend='mpi': must be one of"),
    ],
)  # fmt: skip
def test_device_and_backend_that_do_not_fit_name_the_key(gpus, count, device, backend, message):
    gpus(count)
    with pytest.raises(ValueError, match=message):
        choose_device(device=device, backend=backend)


@pytest.mark.parametrize(
    ("count", "local_rank", "local_world", "index"),
    [
        (8, 5, 8, 5),  # torchrun, one rank per GPU
        (1, 3, 0, 0),  # the scheduler exposes one GPU per task (CUDA_VISIBLE_DEVICES per rank)
        (1, 3, 4, 0),
        (4, 6, 0, 2),  # no LOCAL_WORLD_SIZE: the modulo still lands on a visible GPU
    ],
)
def test_each_rank_gets_local_rank_modulo_the_visible_gpus(
    gpus, monkeypatch, count, local_rank, local_world, index
):
    gpus(count)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert local_cuda_device() == torch.device("cuda", index)


def test_more_local_ranks_than_gpus_is_refused(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE=8 ranks on this node but 4 visible GPUs"):
        local_cuda_device()


def test_the_trainer_checks_the_device_before_any_collective(gpus):
    """A gloo run on a CUDA machine fails in validate_run (before a process group or a file exists)."""
    from training_runs import TINY, compose_config

    from moe_dist.trainer import validate_run

    gpus(8)
    cfg = compose_config(
        [t for t in TINY if not t.startswith("parallel.backend")] + ["parallel.backend=gloo"]
    )
    with pytest.raises(ValueError, match=r"^parallel.backend='gloo' with trainer.device='auto'"):
        validate_run(cfg, world_size=1)
    cfg.parallel.allow_gloo_on_cuda = True
    validate_run(cfg, world_size=1)
