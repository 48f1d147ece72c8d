"""Soak test (not in CI): a long 2-rank CPU run under torchrun --max-restarts with ranks SIGKILLed at random
times, against a clean run of the same config.

    python scripts/soak.py --steps 1000 --kills 3 --out runs/soak

Reports restarts survived, steps lost (work redone after each kill) and the final loss of both runs, as a
table and as JSON (--json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from moe_dist.metrics import read_metrics

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=32",
    "model.ffn_hidden=64",
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.warmup_steps=20",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress_bar=false",
    "parallel.backend=gloo",
    "parallel.ep=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out_dir: Path, steps: int, ckpt_every: int, max_restarts: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "moe_dist.train", *TINY,
        f"trainer.max_steps={steps}", f"trainer.ckpt_every={ckpt_every}", f"trainer.out_dir={out_dir}",
        f"hydra.run.dir={out_dir}/hydra",
    ]  # fmt: skip


def last_step(out_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(out_dir) if "loss" in r), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "moe_dist.train" in " ".join(c.cmdline())]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "MOE_DIST_RUN_STAMP": "soak"}

    start = time.perf_counter()
    subprocess.run(command(args.out / "clean", args.steps, args.ckpt_every, 0), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    clean_s = time.perf_counter() - start

    # Kill points spread over the run, each at a random step within its share.
    share = args.steps // (args.kills + 1)
    kill_at = sorted(rng.randint(i * share + 5, (i + 1) * share) for i in range(1, args.kills + 1))
    log = open(args.out.with_suffix(".log"), "w")  # noqa: SIM115 (closed below)
    start = time.perf_counter()
    proc = subprocess.Popen(
        command(args.out / "killed", args.steps, args.ckpt_every, args.kills + 1), env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    kills = []
    for target in kill_at:
        while proc.poll() is None and last_step(args.out / "killed") < target:
            time.sleep(0.05)
        if proc.poll() is not None:
            break
        victim = rng.choice(workers(proc))
        reached = last_step(args.out / "killed")
        victim.send_signal(signal.SIGKILL)
        kills.append({"at_step": reached, "pid": victim.pid})
        time.sleep(1.0)
    returncode = proc.wait()
    killed_s = time.perf_counter() - start
    log.close()

    text = args.out.with_suffix(".log").read_text()
    resumed = [
        int(line.split(" at step ")[1].split()[0]) for line in text.splitlines() if "resumed from" in line
    ]
    for kill, resumed_at in zip(kills, resumed):
        kill["resumed_at"] = resumed_at
        kill["steps_lost"] = kill["at_step"] - resumed_at
    clean = {r["step"]: r["loss"] for r in read_metrics(args.out / "clean") if "loss" in r}
    killed = {r["step"]: r["loss"] for r in read_metrics(args.out / "killed") if "loss" in r}
    result = {
        "steps": args.steps,
        "returncode": returncode,
        "kills": kills,
        "restarts_survived": len(resumed),
        "steps_lost_total": sum(k.get("steps_lost", 0) for k in kills),
        "final_loss_clean": clean.get(args.steps),
        "final_loss_killed": killed.get(args.steps),
        "max_abs_loss_diff": max(abs(clean[s] - killed[s]) for s in clean if s in killed),
        "steps_logged_once": sorted(killed) == list(range(1, args.steps + 1)),
        "clean_run_s": round(clean_s, 1),
        "killed_run_s": round(killed_s, 1),
    }
    print("| kill | at step | resumed at | steps lost |")
    print("|---|---|---|---|")
    for i, k in enumerate(kills, 1):
        print(f"| {i} | {k['at_step']} | {k.get('resumed_at', '-')} | {k.get('steps_lost', '-')} |")
    print()
    for key in ("restarts_survived", "steps_lost_total", "final_loss_clean", "final_loss_killed",
                "max_abs_loss_diff", "steps_logged_once", "clean_run_s", "killed_run_s", "returncode"):  # fmt: skip
        print(f"{key}: {result[key]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
