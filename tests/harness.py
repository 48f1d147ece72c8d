"""Spawns gloo ranks for a test module: one process group per call, many cases inside it."""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, pg_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{pg_dir}/pg",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = fn(rank, world_size, *args)
    except Exception:
        result = {"__error__": traceback.format_exc()}
    with open(os.path.join(pg_dir, f"result{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


def spawn_ranks(world_size: int, fn, *args) -> list:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` gloo ranks; returns each rank's result.

    ``fn`` must be importable (a module-level function). An exception on any rank fails the caller with
    that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as pg_dir:
        mp.spawn(_worker, args=(world_size, pg_dir, fn, args), nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(pg_dir, f"result{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    for rank, result in enumerate(results):
        if isinstance(result, dict) and "__error__" in result:
            raise AssertionError(f"rank {rank} failed:\n{result['__error__']}")
    return results
