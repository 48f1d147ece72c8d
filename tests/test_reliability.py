"""Reliability: restart after a rank is killed, no silent hangs, checkpoints that cannot be lost or misread,
numerical guards, and no pickled code or secrets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from training_runs import TINY, compose_config, run

from moe_dist import checkpoint as ckpt
from moe_dist.engines.native import NativeEngine
from moe_dist.guards import CollapseDetector, NonFiniteError
from moe_dist.metrics import read_metrics
from moe_dist.model.build import build_model
from moe_dist.parallel.mesh import single_process_mesh

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(out_dir: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m", "moe_dist.train", *TINY, "parallel.ep=2", "trainer.micro_batch_size=4",
        f"trainer.out_dir={out_dir}", f"hydra.run.dir={out_dir}/hydra", *overrides,
    ]  # fmt: skip


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        path = out_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in read_metrics(out_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


def worker_pids(proc: subprocess.Popen) -> list[int]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c.pid for c in children if "moe_dist.train" in " ".join(c.cmdline())]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def load_model(path: Path, overrides: list[str]):
    cfg = compose_config(TINY + overrides)
    model = build_model(cfg, single_process_mesh(), torch.device("cpu"))
    ckpt.load_checkpoint(path, state=ckpt.model_state(model, single_process_mesh()),
                         model_cfg=dataclasses.asdict(cfg.model))  # fmt: skip
    return model


STEPS = 30
RUN = ["trainer.max_steps=30", "trainer.ckpt_every=4", "model.seq_len=64"]


def test_sigkill_of_a_rank_restarts_and_ends_exactly_like_a_clean_run(tmp_path):
    clean = subprocess.run(train_cmd(tmp_path / "clean", *RUN), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]

    proc = subprocess.Popen(
        train_cmd(tmp_path / "killed", *RUN, max_restarts=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    wait_for_step(tmp_path / "killed", 10, proc)
    os.kill(worker_pids(proc)[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output

    a, b = losses(tmp_path / "clean"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, STEPS + 1)), "every step exactly once in metrics.jsonl"
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
    final_a = load_model(tmp_path / "clean" / "checkpoints" / f"step_{STEPS}", RUN)
    final_b = load_model(tmp_path / "killed" / "checkpoints" / f"step_{STEPS}", RUN)
    for (name, p), q in zip(final_a.state_dict().items(), final_b.state_dict().values()):
        assert torch.equal(p, q), name


def test_dead_peer_without_restarts_fails_fast_naming_step_and_collective(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MOE_DIST_RUN_STAMP": "hang", "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "moe_dist.train", *TINY, "parallel.ep=2", "trainer.micro_batch_size=4",
               "trainer.max_steps=100000", "parallel.timeout_s=20", f"trainer.out_dir={tmp_path}/run",
               f"hydra.run.dir={tmp_path}/hydra{rank}", "trainer.ckpt_every=0"]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    wait_for_step(tmp_path / "run", 3, procs[0])
    procs[1].kill()
    killed_at = time.monotonic()
    _, stderr = procs[0].communicate(timeout=120)
    elapsed = time.monotonic() - killed_at
    assert procs[0].returncode != 0
    assert elapsed < 20 + 10 + 5, f"rank 0 took {elapsed:.0f} s to notice"
    last = [line for line in stderr.splitlines() if line.startswith("moe_dist: error:")][-1]
    assert "rank 0, step" in last and "during" in last, last


def tiny_model(overrides: list[str] | None = None):
    cfg = compose_config(TINY + (overrides or []))
    model = build_model(cfg, single_process_mesh(), torch.device("cpu"))
    engine = NativeEngine(model, engine=cfg.engine, trainer=cfg.trainer, mesh=single_process_mesh())
    return cfg, model, engine


def save(out_dir: Path, step: int, model, engine, keep: int = 5) -> Path:
    state = ckpt.model_state(model, single_process_mesh()) | engine.checkpoint_state()
    return ckpt.save_checkpoint(out_dir, step=step, state=state, meta={"model": dataclasses.asdict(model.cfg)},
                                keep=keep)  # fmt: skip


KILL_MID_SAVE = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_reliability import tiny_model, save
from moe_dist import checkpoint
cfg, model, optim = tiny_model()
save({out!r}, 1, model, optim)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
def stall(*args, **kwargs):
    print("SAVING", flush=True)
    time.sleep(600)
checkpoint.all_gather_json = stall  # every rank wrote its files: the digests are being gathered
save({out!r}, 2, model, optim)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    script = KILL_MID_SAVE.format(tests=str(REPO / "tests"), out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "SAVING"
    proc.kill()
    proc.wait()
    assert (tmp_path / "checkpoints" / ".tmp_step_2").is_dir()  # the half-written save is there...
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1]  # ...and ignored
    path, warnings = ckpt.select_checkpoint("auto", tmp_path)
    assert path.endswith("step_1") and warnings == []
    _, fresh, _ = tiny_model()
    _, loaded, _ = tiny_model()
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    ckpt.load_checkpoint(path, state=ckpt.model_state(loaded, single_process_mesh()),
                         model_cfg=dataclasses.asdict(loaded.cfg))  # fmt: skip
    for p, q in zip(fresh.parameters(), loaded.parameters()):
        assert torch.equal(p, q)


ASYNC_STALL = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import moe_dist.checkpoint as checkpoint
write_data = checkpoint._Writer.write_data
def stalling(self, plan, planner):
    result = write_data(self, plan, planner)  # rank 1's file of step 4 is on disk, its write not yet reported
    if os.environ["RANK"] == "1" and "tmp_step_4" in str(self.path):
        Path({out!r}, "stalled").write_text(str(os.getpid()))
        time.sleep(600)
    return result
checkpoint._Writer.write_data = stalling
from training_runs import compose_config
from test_reliability import TINY
from moe_dist.trainer import train
train(compose_config(TINY + {overrides!r}), default_out_dir={out!r})
"""


def test_kill_during_an_async_save_keeps_the_previous_checkpoint_while_training_went_on(tmp_path):
    out = tmp_path / "run"
    overrides = ["parallel.ep=2", "trainer.micro_batch_size=4", "trainer.max_steps=8", "trainer.ckpt_every=2",
                 "trainer.async_checkpoint=true", f"trainer.out_dir={out}", f"hydra.run.dir={out}/hydra"]  # fmt: skip
    script = tmp_path / "stall.py"
    script.write_text(ASYNC_STALL.format(tests=str(REPO / "tests"), out=str(out), overrides=overrides))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(out, 5, proc)  # the step-4 save went to the background and training went on
    deadline = time.monotonic() + 60
    while not (out / "stalled").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    root = out / "checkpoints"
    assert not (root / "step_4").exists() and not (root / ".tmp_step_4" / "meta.json").exists()
    os.kill(int((out / "stalled").read_text()), signal.SIGKILL)  # rank 1, in the middle of its save
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-3000:]

    assert (root / ".tmp_step_4").is_dir()  # the interrupted save is there, without meta.json...
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]  # ...and the newest complete one is step 2
    assert ckpt.select_checkpoint("auto", out) == (str(root / "step_2"), [])
    before = losses(out)
    resumed = subprocess.run(train_cmd(out, "trainer.max_steps=8", "trainer.ckpt_every=2"), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_2 at step 2" in resumed.stdout
    after = losses(out)
    assert sorted(after) == list(range(1, 9))
    assert all(after[s] == before[s] for s in before if s >= 3), (before, after)


def test_incompatible_checkpoint_is_refused_listing_every_difference(tmp_path):
    _, model, optim = tiny_model()
    path = save(tmp_path, 1, model, optim)
    other = ["model.dim=48", "model.moe.num_experts=8", "model.vocab_size=300"]
    with pytest.raises(ValueError) as err:
        load_model(path, other)
    message = str(err.value)
    for piece in ("model.dim: checkpoint 32 vs run 48", "model.moe.num_experts: checkpoint 4 vs run 8",
                  "model.vocab_size: checkpoint 256 vs run 300"):  # fmt: skip
        assert piece in message, message


def test_corrupted_file_is_detected_and_auto_resume_falls_back(tmp_path):
    _, model, optim = tiny_model()
    save(tmp_path, 1, model, optim)
    newest = save(tmp_path, 2, model, optim)
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "does not match its sha256" in ckpt.verify(newest)
    path, warnings = ckpt.select_checkpoint("auto", tmp_path)
    assert path.endswith("step_1")
    assert len(warnings) == 1 and "step 2" in warnings[0]
    with pytest.raises(ValueError, match=r"trainer.resume=.*corrupted"):
        ckpt.select_checkpoint(str(newest), tmp_path)


def test_retention_keeps_the_newest_k(tmp_path):
    _, model, optim = tiny_model()
    for step in range(1, 6):
        save(tmp_path, step, model, optim, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [4, 5]


def test_checkpoint_metadata_with_foreign_pickle_is_refused(tmp_path):
    _, model, optim = tiny_model()
    path = save(tmp_path, 1, model, optim)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        ckpt.SafeFileSystemReader(str(path)).read_metadata()
    assert not marker.exists()


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import moe_dist.trainer as trainer

    calls = {"n": 0}
    real = trainer.lm_loss

    def poisoned(model, inputs, targets):
        calls["n"] += 1
        loss = real(model, inputs, targets)
        return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer, "lm_loss", poisoned)
    run(["trainer.max_steps=5", f"trainer.out_dir={tmp_path}/skip", "trainer.micro_batch_size=8"])
    records = [r for r in read_metrics(tmp_path / "skip") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 3)

    calls["n"] = 0
    with pytest.raises(
        NonFiniteError, match=r"step 3: non-finite gradient .* first in tok_embeddings.weight"
    ):
        run(["trainer.max_steps=5", f"trainer.out_dir={tmp_path}/stop", "trainer.micro_batch_size=8",
             "trainer.max_nonfinite_skips=0"])  # fmt: skip


def test_router_collapse_is_reported_once_per_episode():
    detector = CollapseDetector(["layers.0.ffn", "layers.1.ffn"], 3, warn_after=2, device="cpu")
    starved = torch.tensor([[5.0, 0.0, 5.0], [5.0, 5.0, 5.0]])
    detector.update(starved)
    assert detector.new_warnings() == []
    detector.update(starved)
    warnings = detector.new_warnings()
    assert len(warnings) == 1 and "layers.0.ffn expert 1 received no tokens for 2 steps" in warnings[0]
    detector.update(starved)
    assert detector.new_warnings() == []  # already reported
    detector.update(torch.full((2, 3), 5.0))
    assert detector.new_warnings() == [] and detector.streak.sum() == 0


def test_secrets_stay_out_of_run_files_and_umask_is_respected(tmp_path, monkeypatch):
    secret = "wandb-secret-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    old = os.umask(0o027)
    try:
        run(["trainer.max_steps=2", f"trainer.out_dir={tmp_path}/run", "trainer.micro_batch_size=8",
             "logging.wandb.mode=offline"])  # fmt: skip
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 5
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    for d in [tmp_path / "run", tmp_path / "run" / "checkpoints"]:
        assert d.stat().st_mode & 0o777 == 0o750, oct(d.stat().st_mode)
    json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
