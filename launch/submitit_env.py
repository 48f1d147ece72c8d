"""Hydra callback for ``hydra/launcher=slurm`` sweeps: one submitit task per rank, one run dir per sweep.

submitit starts ``nodes x tasks_per_node`` copies of the Hydra job, but sets only its own / Slurm's
variables; torch.distributed (and ``moe_dist.distributed``) read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Without them every task would train alone as a world of 1, all
writing the same run directory. ``on_job_start`` runs inside each task, before ``moe_dist.train.main``.

It also pins ``MOE_DIST_RUN_STAMP`` on the submitting host, so that the sweep directory is one name for
the submitter and for every job (each job re-composes its config, re-evaluating ``hydra.sweep.dir``).
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RUN_STAMP_ENV = "MOE_DIST_RUN_STAMP"
MIN_PORT, NUM_PORTS = 20_000, 40_000


def default_master_port(job_id: str) -> int:
    """The same port on every task of a job (derived from the job id), unless MASTER_PORT is set."""
    return MIN_PORT + zlib.crc32(job_id.encode()) % NUM_PORTS


def torch_env(
    *, global_rank: int, local_rank: int, num_tasks: int, num_nodes: int, hostnames: list[str], job_id: str
) -> dict[str, str]:
    """The env:// variables for one task of a submitit job."""
    return {
        "RANK": str(global_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(default_master_port(job_id)),
    }


class SubmititDistributedEnv(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.setdefault(RUN_STAMP_ENV, time.strftime("%Y-%m-%d_%H-%M-%S"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
            return  # not a submitit task, or launched by torchrun, which already set everything
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks == 1:
            return
        os.environ.update(
            torch_env(
                global_rank=env.global_rank,
                local_rank=env.local_rank,
                num_tasks=env.num_tasks,
                num_nodes=env.num_nodes,
                hostnames=list(env.hostnames),
                job_id=str(env.job_id),
            )
        )
