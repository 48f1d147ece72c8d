"""Launch scripts and the Hydra Slurm launcher config, exercised without Slurm.

The sbatch script runs under bash with a stand-in ``srun`` first on PATH (it records its arguments and
then executes the command after its options), with the SLURM_* variables of a one-node job.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
HAS_SUBMITIT_LAUNCHER = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None

FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: record the environment knob and arguments, drop srun's options, run the command.
printf '%s\\n' "MOE_DIST_RUN_STAMP=$MOE_DIST_RUN_STAMP" "$@" > "$SRUN_ARGS_FILE"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp_path: Path, **slurm: str) -> dict[str, str]:
    """This environment minus anything Slurm or torchrun set, plus a stand-in srun first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    dropped = ("SLURM_", "SRUN_", "MOE_DIST_", "TORCHELASTIC_")
    dropped_names = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE"}
    dropped_names |= {"TORCHRUN", "PYTHON", "SRUN", "MAX_RESTARTS"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped) and k not in dropped_names}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["SRUN_ARGS_FILE"] = str(tmp_path / "srun_args")
    env.update(slurm)
    return env


def test_sbatch_arguments_without_running(tmp_path):
    env = launch_env(
        tmp_path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="test",
        SLURM_NNODES="3",
        SLURM_JOB_NODELIST="gpu[003-004,9],cpu1",
        SLURM_GPUS_ON_NODE="4",
        TORCHRUN="true",  # the command srun runs: succeeds without doing anything
    )
    proc = subprocess.run(
        ["bash", str(SBATCH), "model.n_layers=2"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[0] == "MOE_DIST_RUN_STAMP=4242"
    assert "--kill-on-bad-exit=1" in args
    assert args[args.index("true") + 1 :] == [
        "--nnodes=3",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu003:29500",
        "--rdzv_id=4242",
        "--max_restarts=0",
        "-m",
        "moe_dist.train",
        "trainer.out_dir=runs/test_4242",
        "model.n_layers=2",
    ]


@pytest.mark.parametrize(
    ("unset", "extra", "message"),
    [
        ("SLURM_JOB_ID", {}, "SLURM_JOB_ID"),
        ("SLURM_JOB_NODELIST", {}, "SLURM_JOB_NODELIST"),
        (None, {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE"),
    ],
)
def test_sbatch_user_errors(tmp_path, unset, extra, message):
    slurm = {"SLURM_JOB_ID": "1", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "TORCHRUN": "true"}
    slurm.pop(unset, None)
    env = launch_env(tmp_path, **slurm, **extra)
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "srun_args").exists()


def test_sbatch_trains_two_ranks_on_one_node(tmp_path):
    out_dir = tmp_path / "run"
    env = launch_env(
        tmp_path,
        NPROC_PER_NODE="2",
        SLURM_JOB_ID="4242",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NAME="test",
        MASTER_PORT=str(free_port()),
        PYTHON=sys.executable,
    )
    overrides = [
        "experiment=cpu_demo",
        "trainer.max_steps=3",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        f"trainer.out_dir={out_dir}",
        "model.n_layers=2",
    ]
    proc = subprocess.run(
        ["bash", str(SBATCH), *overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "world=2" in output, output[-4000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10, r["loss"]  # ~ln(256) = 5.5 at init
        assert len(r["expert_load"]) == 2  # one row per MoE layer
        assert all(sum(row) == pytest.approx(1.0) for row in r["expert_load"])
    assert (out_dir / "checkpoints" / "step_3").is_dir()
    assert (out_dir / "checkpoints" / "step_3" / "meta.json").is_file()


@pytest.mark.skipif(not HAS_SUBMITIT_LAUNCHER, reason="hydra-submitit-launcher is not installed")
def test_hydra_slurm_launcher_composes():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_dist.train",
            "--cfg",
            "hydra",
            "hydra/launcher=slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.partition=gpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert SLURM_LAUNCHER in proc.stdout
    hydra = OmegaConf.create(proc.stdout).hydra
    launcher = hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.nodes, launcher.partition, launcher.gpus_per_node) == (2, "gpu", 8)
    assert launcher.tasks_per_node == launcher.gpus_per_node
    assert OmegaConf.to_container(launcher)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert hydra.callbacks.submitit_env._target_ == "launch.submitit_env.SubmititDistributedEnv"


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed")
def test_submitit_callback_sets_torch_env(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from launch.submitit_env import SubmititDistributedEnv, default_master_port

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown removes what the callback sets
        monkeypatch.delenv(key)
    slurm_task = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "77",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
    }
    for key, value in slurm_task.items():
        monkeypatch.setenv(key, value)
    SubmititDistributedEnv().on_job_start(config=OmegaConf.create(), task_function=None)
    got = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert got == {
        "RANK": "11",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu003",
    }
    port = int(os.environ["MASTER_PORT"])
    assert port == default_master_port("77") and 20_000 <= port < 60_000


def test_submitit_callback_leaves_torchrun_and_plain_runs_alone(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from launch.submitit_env import RUN_STAMP_ENV, SubmititDistributedEnv

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    before = dict(os.environ)
    SubmititDistributedEnv().on_job_start(config=OmegaConf.create(), task_function=None)
    assert dict(os.environ) == before

    monkeypatch.setenv(RUN_STAMP_ENV, "given")
    SubmititDistributedEnv().on_multirun_start(config=OmegaConf.create())
    assert os.environ[RUN_STAMP_ENV] == "given"
    monkeypatch.delenv(RUN_STAMP_ENV)
    SubmititDistributedEnv().on_multirun_start(config=OmegaConf.create())
    assert os.environ[RUN_STAMP_ENV]  # pinned for every job of the sweep (monkeypatch restores it)
