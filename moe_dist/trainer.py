"""The training loop, top to bottom: set-up (``build_run``), one optimizer step (``train_step``: accumulate →
sync → clip → step → stats), and the cadence around it (log, eval, checkpoint)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from moe_dist.checkpoint import (
    Checkpointer,
    checkpoint_group,
    load_checkpoint,
    model_state,
    select_checkpoint,
    validate_resume,
)
from moe_dist.config import Config, batch_layout, validate
from moe_dist.data import Batch, TokenSplits, load_tokens, rank_batch
from moe_dist.distributed import (
    broadcast_json,
    choose_device,
    collective_timeout_s,
    env_world_size,
    init_distributed,
)
from moe_dist.engines import Engine, build_engine, validate_engine
from moe_dist.guards import CollapseDetector, NonFiniteGuard, Watchdog
from moe_dist.memory import peak_memory_bytes, peak_memory_source, reset_peak_memory
from moe_dist.metrics import MetricsLogger, truncate_metrics
from moe_dist.mfu import device_peak_tflops
from moe_dist.model.build import build_model, validate_init_from
from moe_dist.model.loss import IGNORE_INDEX
from moe_dist.model.transformer import Transformer, count_parameters, model_flops_per_token
from moe_dist.moe.layer import MoELayer
from moe_dist.optim import lr_at
from moe_dist.parallel.mesh import Mesh, build_mesh
from moe_dist.precision import autocast, resolve_precision
from moe_dist.transfer import to_device

EVAL_SEED_OFFSET = 7_919  # eval batches come from (seed + offset, i): never the training draws

# The phases of train_step, in order. A phase hook (``phase(name)`` → context manager) sees each of them:
# the trainer's names the watchdog phase, scripts/bench_train.py's times them.
STEP_PHASES = (
    "data",
    "forward",
    "backward",
    "stats",
    "reduce_gradients",
    "nonfinite_check",
    "optimizer",
    "stats_sync",
)
# What a hang in a phase with collectives means, for the watchdog's message.
WATCHDOG_PHASES = {
    "forward": "forward (MoE all-to-all dispatch and combine, router all-reduce)",
    "backward": "backward (MoE all-to-all of the gradients)",
    "reduce_gradients": "gradient all-reduce (dense over world, experts over EDP)",
    "stats_sync": "expert-count all-reduce",
}
PhaseHook = Callable[[str], AbstractContextManager]


def no_phases(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def step_seed(seed: int, step: int, rank: int) -> int:
    """Stateless RNG (noisy gating): a function of (seed, step, rank), so resuming needs no RNG state."""
    return seed * 1_000_003 + step * 65_537 + rank


def run_device(cfg: Config) -> tuple[str, str]:
    """(device type, backend) of the run: trainer.device and parallel.backend checked against this machine."""
    p = cfg.parallel
    return choose_device(
        device=cfg.trainer.device, backend=p.backend, allow_gloo_on_cuda=p.allow_gloo_on_cuda
    )


def validate_run(cfg: Config, *, world_size: int) -> None:
    """Every check of a run config, before any collective or file write: the schema (config.py), the device
    and backend on this machine, the chosen engine's own config, the checkpoint to resume from and the
    weights to start from."""
    validate(cfg, world_size=world_size)
    run_device(cfg)
    validate_engine(cfg.engine, cfg.trainer, world_size=world_size, model=cfg.model, ep=cfg.parallel.ep)
    validate_resume(cfg.trainer.resume)
    validate_init_from(cfg)


class StepStats:
    """Sums over the micro-batches of one step: losses and expert counts on the device, copy counts on the
    host (they are host integers already); one all-reduce, and one host copy when read."""

    def __init__(self, model: Transformer, device: torch.device):
        self.num_layers = sum(1 for _ in model.moe_layers())
        self.num_experts = model.cfg.moe.num_experts
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(3, dtype=torch.float64, device=self.device)  # ce, aux, z
        self.host_sums = [0, 0, 0]  # dropped copies, routed copies, micro-batches
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=self.device)
        self.exchange_rounds = 1  # the most rounds a layer needed (recv_budget); the same on every rank
        self.scalars: torch.Tensor | None = None  # [ce, aux, z, dropped, copies, micro], after the all-reduce

    def add(self, ce: torch.Tensor, model: Transformer) -> None:
        layers = list(model.moe_layers())
        aux = sum((m.stats.aux_loss.detach() for m in layers), torch.zeros((), device=self.device))
        z = sum((m.stats.z_loss.detach() for m in layers), torch.zeros((), device=self.device))
        self.losses += torch.stack([ce.detach().double(), aux.double(), z.double()])
        self.host_sums[0] += sum(m.stats.num_dropped for m in layers)
        self.host_sums[1] += sum(m.stats.num_copies for m in layers)
        self.host_sums[2] += 1
        for i, m in enumerate(layers):
            self.counts[i] += m.stats.counts_E
            # Activation checkpointing recomputes the router in backward, with grad: drop that graph.
            m.stats.aux_loss, m.stats.z_loss = m.stats.aux_loss.detach(), m.stats.z_loss.detach()
        self.exchange_rounds = max([self.exchange_rounds] + [m.stats.exchange_rounds for m in layers])

    def start_all_reduce(self, mesh: Mesh) -> None:
        """Starts summing over all ranks, once per step, also at world 1 (in flight while gradients are
        reduced and the optimizer steps); ``finish_all_reduce`` waits for it."""
        host = to_device(torch.tensor(self.host_sums, dtype=torch.float64), self.device)  # no host wait
        self.flat = torch.cat([self.losses, host, self.counts.reshape(-1)])
        self.work = None
        if mesh.world_group is not None:
            self.work = dist.all_reduce(self.flat, group=mesh.world_group, async_op=True)

    def finish_all_reduce(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.scalars, self.counts = self.flat[:6], self.flat[6:].view_as(self.counts)

    def record(self) -> dict:
        ce, aux, z, dropped, copies, micro = self.scalars.tolist()
        load = self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1)
        return {
            "loss": ce / micro,  # micro counts micro-batches over all ranks: the global-batch mean
            "aux_loss": aux / micro / max(1, self.num_layers),
            "z_loss": z / micro / max(1, self.num_layers),
            "dropped_frac": dropped / copies if copies else 0.0,
            "expert_load": load.tolist(),
            "exchange_rounds": self.exchange_rounds,
        }


def lm_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, **batch_extras) -> torch.Tensor:
    """Mean next-token cross-entropy (chunked over the vocabulary inside the model: no full logits; summed in
    the accumulation dtype: fp32 under bf16, fp64 in fp64 mode)."""
    return model(inputs, targets_BS=targets, **batch_extras)


@dataclass
class Run:
    """Everything set-up produces; ``train_step`` reads and advances it."""

    cfg: Config
    mesh: Mesh
    device: torch.device
    data: TokenSplits
    model: Transformer
    engine: Engine
    autocast: AbstractContextManager
    accum_steps: int  # micro-batches per rank per optimizer step
    micro_batch_size: int  # sequences per rank per micro-step
    stats: StepStats
    nonfinite: NonFiniteGuard
    collapse: CollapseDetector
    timeout_s: float  # collective timeout of the run's backend
    checkpoint_group: (
        dist.ProcessGroup | None
    )  # gloo group for checkpoint traffic (None without a process group)
    # The next step's micro-batches (all fields), loaded at the end of a step: (step, [batch, ...]).
    prefetched: tuple[int, list[Batch]] | None = None


def build_run(cfg: Config) -> Run:
    """Validates, loads the data, starts the process group, builds the mesh, the model and the engine."""
    world_size = env_world_size()
    validate_run(cfg, world_size=world_size)  # user errors surface here, before any collective or file write
    mcfg = cfg.model
    data = load_tokens(cfg.data, vocab_size=mcfg.vocab_size, seq_len=mcfg.seq_len)
    device_type, backend = run_device(cfg)
    timeout_s = collective_timeout_s(backend, cfg.parallel.timeout_s)
    # FSDP2 shards over a DeviceMesh, which needs a process group also at world 1.
    device = init_distributed(
        device_type=device_type,
        backend=backend,
        timeout_s=timeout_s,
        single_rank_group=cfg.engine.name == "fsdp",
    )
    mesh = build_mesh(ep=cfg.parallel.ep, num_experts=mcfg.moe.num_experts)
    model = build_model(cfg, mesh, device)
    return assemble_run(cfg, mesh=mesh, device=device, data=data, model=model, timeout_s=timeout_s)


def assemble_run(
    cfg: Config,
    *,
    mesh: Mesh,
    device: torch.device,
    data: TokenSplits,
    model: Transformer,
    timeout_s: float,
    checkpoints: bool = True,
) -> Run:
    """The engine and the step's state around a built model. moe_dist.plan calls it with fake devices and
    ``checkpoints=False`` (no checkpoint group: a plan saves nothing)."""
    t, mcfg = cfg.trainer, cfg.model
    engine = build_engine(model, engine=cfg.engine, trainer=t, mesh=mesh)
    # After the engine: DeepSpeed starts a process group of its own in a world of 1.
    ckpt_group = checkpoint_group(timeout_s=timeout_s) if checkpoints else None
    moe_names = [name for name, m in model.named_modules() if isinstance(m, MoELayer)]
    micro_batch_size, accum_steps = batch_layout(t, world_size=mesh.world_size)
    precision = resolve_precision(t.precision, device)
    return Run(
        cfg=cfg,
        mesh=mesh,
        device=device,
        data=data,
        model=model,
        engine=engine,
        # bf16 under fsdp: FSDP2's MixedPrecisionPolicy gathers bf16 parameters, no autocast (model/build.py).
        autocast=autocast(precision if cfg.engine.name != "fsdp" else "fp32", device),
        accum_steps=accum_steps,
        micro_batch_size=micro_batch_size,
        stats=StepStats(model, device),
        nonfinite=NonFiniteGuard(t.max_nonfinite_skips),
        collapse=CollapseDetector(
            moe_names, mcfg.moe.num_experts, warn_after=t.collapse_warn_steps, device=device
        ),
        timeout_s=timeout_s,
        checkpoint_group=ckpt_group,
    )


@dataclass
class StepResult:
    grad_norm: torch.Tensor  # exact global norm before clipping (identical on all ranks)
    skip_message: str | None  # set when the step was skipped (non-finite gradients)


def train_step(run: Run, step: int, *, phase: PhaseHook = no_phases) -> StepResult:
    """One optimizer step: accumulate the micro-batches → reduce gradients (exact norm) → clip and step →
    global expert counts (bias update, collapse detector). ``run.stats`` holds the step's sums afterwards."""
    t, model, engine = run.cfg.trainer, run.model, run.engine
    with phase("data"):
        engine.set_lr(lr_at(step, t))
        torch.manual_seed(step_seed(t.seed, step, run.mesh.rank))
        batches = step_batches(run, step)  # on the device already (prefetched by the previous step)
    for i, micro in enumerate(batches):
        with phase("forward"), run.autocast:
            ce = lm_loss(model, micro.inputs, micro.targets, **micro.model_kwargs())
            if micro.global_targets != t.global_batch_size * run.cfg.model.seq_len:
                ce = ce * token_share(
                    micro, num_micro_batches=run.mesh.world_size * run.accum_steps, dtype=ce.dtype
                )
            loss = (ce + model.moe_loss()) / run.accum_steps
        with phase("backward"):
            engine.backward(loss, last_micro_batch=i == run.accum_steps - 1)
        with phase("stats"):
            run.stats.add(ce, model)
    with phase("stats"):
        run.stats.start_all_reduce(run.mesh)  # global sums in flight (after the gradient buckets)
    with phase("reduce_gradients"):
        grad_norm = engine.reduce_gradients()
    with phase("nonfinite_check"):
        # Host sync: the skip decision is taken on the host (identical on all ranks: the norm is).
        skip_message = run.nonfinite.should_skip(step=step, grad_norm=grad_norm.item(), model=model)
    with phase("optimizer"):
        if skip_message is None:
            engine.step(grad_norm, max_norm=t.grad_clip)
        engine.zero_grad()
    with phase("stats_sync"):
        run.stats.finish_all_reduce()  # global expert counts: the same on every rank
        if skip_message is None:
            for layer, counts_E in zip(model.moe_layers(), run.stats.counts):
                layer.router.update_bias(counts_E)
            run.collapse.update(run.stats.counts)
    if step < t.max_steps:
        with phase("data"):
            run.prefetched = (step + 1, [micro_batch(run, step + 1, i) for i in range(run.accum_steps)])
    return StepResult(grad_norm, skip_message)


def step_batches(run: Run, step: int) -> list[Batch]:
    """Every micro-step's batch (every field of it) of ``step`` on the device: prefetched at the end of the step
    before when there was one, so on CUDA the copy of the next step's batch overlaps this step's work."""
    if run.prefetched is not None and run.prefetched[0] == step:
        batches = run.prefetched[1]
    else:
        batches = [micro_batch(run, step, i) for i in range(run.accum_steps)]
    run.prefetched = None
    return batches


def micro_batch(run: Run, step: int, i: int) -> Batch:
    """This rank's rows of micro-step ``i`` of ``step``, on the device.

    Micro-step i is the slice [i·G/A, (i+1)·G/A) of the global batch (G sequences, A micro-steps), split
    evenly over the W ranks: rank r reads the slice of a "rank" i·W + r among W·A. So with the same A every
    micro-step holds the same sequences at any world size (what the micro_step aux-loss scope sees).
    """
    t, mesh = run.cfg.trainer, run.mesh
    batch = rank_batch(
        run.data.train,
        seed=t.seed,
        step=step,
        global_batch_size=t.global_batch_size,
        seq_len=run.cfg.model.seq_len,
        rank=i * mesh.world_size + mesh.rank,
        world_size=mesh.world_size * run.accum_steps,
        document_mask=run.cfg.data.document_mask,
    )
    return batch.rows(slice(None), run.device)  # pinned, non-blocking on CUDA


def token_share(micro: Batch, *, num_micro_batches: int, dtype: torch.dtype) -> torch.Tensor:
    """The factor that turns a micro-batch's mean over its trained targets (SFT loss masks) into its share of
    the mean over all trained targets of the global batch: its target count over the count it would have if
    the global batch's ``global_targets`` were spread evenly over the ``num_micro_batches`` (= W x A).

    The step's loss, the mean over ranks and micro-steps of the weighted means, is then the token mean of the
    global batch at any world size and accumulation split. 0 when the global batch trains no target. In the
    loss's dtype (an integer count over a float is float32: fp64 mode would lose the split invariance).
    """
    even = micro.global_targets / num_micro_batches
    return (micro.targets != IGNORE_INDEX).sum().to(dtype) / max(even, 1e-9)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss per target token over trainer.eval_batches global batches (the same batches at
    any world size)."""
    cfg, mesh, model = run.cfg, run.mesh, run.model
    t = cfg.trainer
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    for i in range(t.eval_batches):
        batch = rank_batch(
            run.data.val,
            seed=t.seed + EVAL_SEED_OFFSET,
            step=i,
            global_batch_size=t.global_batch_size,
            seq_len=cfg.model.seq_len,
            rank=mesh.rank,
            world_size=mesh.world_size,
            document_mask=cfg.data.document_mask,
        )
        for start in range(0, len(batch.inputs), run.micro_batch_size):
            micro = batch.rows(slice(start, start + run.micro_batch_size), run.device)
            with run.autocast:
                loss = lm_loss(model, micro.inputs, micro.targets, **micro.model_kwargs())
            num_targets = (micro.targets != IGNORE_INDEX).sum().double()
            total += torch.stack([loss.double() * num_targets, num_targets])
    if mesh.world_group is not None:
        dist.all_reduce(total, group=mesh.world_group)
    model.train()
    return (total[0] / total[1]).item()


def training_state(run: Run) -> dict:
    """What a checkpoint holds, in the global layout, aliasing the live state: the model's buffers and the
    engine's fp32 masters and AdamW slots (only the pieces this rank holds)."""
    # The engine first: fsdp reshards its units there, and model_state must alias the sharded parameters.
    engine_state = run.engine.checkpoint_state()
    return model_state(run.model, run.mesh) | engine_state


def _checkpoint_meta(run: Run) -> dict:
    return {
        "model": dataclasses.asdict(run.cfg.model),
        "seed": run.cfg.trainer.seed,
        "data": run.data.description,
        "engine": run.cfg.engine.name,
        "ep": run.mesh.ep,
    }


class Cadence:
    """What happens between steps on a schedule: the log line and record, eval, and checkpoints."""

    def __init__(
        self,
        run: Run,
        *,
        checkpointer: Checkpointer,
        logger: MetricsLogger,
        watchdog: Watchdog,
        start_step: int,
    ):
        self.run, self.checkpointer, self.logger, self.watchdog = run, checkpointer, logger, watchdog
        t = run.cfg.trainer
        self.last_step = t.stop_at_step or t.max_steps
        self.tokens_per_step = t.global_batch_size * run.cfg.model.seq_len
        self.flops_per_token = model_flops_per_token(run.model)
        self.peak_tflops, self.peak_source = None, "not measured on this rank"
        if logger.enabled:
            precision = resolve_precision(t.precision, run.device)
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[precision]
            self.peak_tflops, self.peak_source = device_peak_tflops(
                run.device, dtype, configured=t.peak_tflops
            )
        self.window_start, self.window_steps, self.last_load = time.perf_counter(), 0, []
        reset_peak_memory(run.device)
        self.bar = tqdm(
            total=t.max_steps,
            initial=start_step,
            disable=not (logger.enabled and t.progress_bar),
            leave=False,
        )

    def peak_description(self) -> str:
        if self.peak_tflops is None:
            return self.peak_source
        return f"{self.peak_tflops:.4g} TFLOP/s per device ({self.peak_source})"

    def after_step(self, step: int, result: StepResult) -> None:
        t = self.run.cfg.trainer
        if result.skip_message is not None:
            self.logger.console(result.skip_message)
        self.window_steps += 1
        self.bar.update(1)
        if step % t.log_every == 0 or step == self.last_step:
            self.log(step, result)
        self.run.stats.reset()
        if t.eval_every and (step % t.eval_every == 0 or step == self.last_step):
            with self.watchdog.phase(step, "evaluation (forward all-to-all, loss all-reduce)"):
                val_loss = evaluate(self.run)
            self.logger.log({"step": step, "val_loss": val_loss})
            self.logger.console(f"step {step:>6} | val_loss {val_loss:.4f}")
            self.logger.log_expert_heatmap(step, self.last_load)
        self.report_completed_saves(step)
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == self.last_step:
            self.save(step)

    def save(self, step: int) -> None:
        """A checkpoint of this step; its stall (the time training waits for it) goes to metrics.jsonl."""
        if self.checkpointer.is_async:
            phase = "checkpoint save (previous background save to finish, copy to host memory)"
        else:
            phase = "checkpoint save (DCP write with sha256 per rank, digest gather, rename)"
        with self.watchdog.phase(step, phase):
            report = self.checkpointer.save(step, training_state(self.run), meta=_checkpoint_meta(self.run))
        self.report_completed_saves(step)
        self.logger.log(
            {"step": step, "checkpoint_stall_s": report.stall_s, "checkpoint_async": report.is_async}
        )
        detail = "written in the background" if report.is_async else "complete"
        self.logger.console(
            f"step {step:>6} | checkpoint {report.path} ({detail}, stall {report.stall_s:.2f} s)"
        )

    def report_completed_saves(self, step: int) -> None:
        """Background saves that completed since the last call (an error in one is raised here)."""
        self.checkpointer.poll()
        for done in self.checkpointer.completed:
            self.logger.log(
                {
                    "step": step,
                    "checkpoint_completed_step": done["step"],
                    "checkpoint_write_s": done["write_s"],
                }
            )
            self.logger.console(
                f"step {step:>6} | checkpoint of step {done['step']} complete ({done['write_s']:.2f} s in the background)"
            )
        self.checkpointer.completed.clear()

    def log(self, step: int, result: StepResult) -> None:
        """One record (metrics.jsonl, wandb) and one console line; host reads of the step's statistics."""
        run = self.run
        tokens_per_s = self.tokens_per_step * self.window_steps / (time.perf_counter() - self.window_start)
        tflops = self.flops_per_token * tokens_per_s / run.mesh.world_size / 1e12
        record = {
            "step": step,
            **run.stats.record(),
            "lr": lr_at(step, run.cfg.trainer),
            "grad_norm": result.grad_norm.item(),
            "tokens_per_s": tokens_per_s,  # all ranks together, averaged over the log window
            "model_tflops_per_rank": tflops,  # model FLOPs (model_flops_per_token) per second per rank
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,  # against the device peak
            "skipped_steps": run.nonfinite.skipped,
            **self.peak_memory(),
        }
        self.logger.log(record)
        mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        self.logger.console(
            f"step {step:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad_norm {record['grad_norm']:.3f} | tok/s {tokens_per_s:,.0f} | "
            f"TFLOP/s/rank {tflops:.3g} | MFU {mfu} | "
            f"aux {record['aux_loss']:.4f} | dropped {record['dropped_frac']:.3f} | "
            f"max load {max((max(r) for r in record['expert_load']), default=0):.3f} | "
            f"peak mem {max(record['peak_memory_mib']):,.0f} MiB"
        )
        for warning in run.collapse.new_warnings():
            self.logger.console(warning)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.last_load = record["expert_load"]
        reset_peak_memory(run.device)

    def peak_memory(self) -> dict:
        """Every rank's peak memory of this log window (collective: an all-gather of one number per rank)."""
        run = self.run
        peak = torch.tensor([peak_memory_bytes(run.device) / 2**20], dtype=torch.float64, device=run.device)
        if run.mesh.world_group is not None:
            gathered = peak.new_empty(run.mesh.world_size)
            all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            all_gather(gathered, peak, group=run.mesh.world_group)
            peak = gathered
        return {"peak_memory_mib": peak.tolist(), "peak_memory_source": peak_memory_source(run.device)}

    def close(self, step: int) -> None:
        with self.watchdog.phase(step, "waiting for the background checkpoint save to complete"):
            self.checkpointer.close()
        self.report_completed_saves(step)
        self.bar.close()
        self.logger.close()


def _resume(run: Run, out_dir: Path, watchdog: Watchdog) -> tuple[int, str | None, list[str]]:
    """(start step, checkpoint path or None, warnings): verifies (each rank a share of the files) and loads
    the checkpoint that trainer.resume selects; every rank gets the same answer or the same error."""
    with watchdog.phase(0, "verifying checkpoints (each rank hashes its share of the files)"):
        path, warnings = select_checkpoint(run.cfg.trainer.resume, out_dir, group=run.checkpoint_group)
    if path is None:
        return 0, None, warnings
    with watchdog.phase(0, f"loading checkpoint {path} (each rank reads the pieces it holds)"):
        state = training_state(run)
        meta = load_checkpoint(
            path, state=state, model_cfg=dataclasses.asdict(run.cfg.model), group=run.checkpoint_group
        )
        run.engine.after_checkpoint_load(state)
    return meta["step"], path, warnings


def train(cfg: Config, *, default_out_dir: str) -> Path:
    """Runs (or resumes) training; returns the run directory. Every rank calls it."""
    run = build_run(cfg)
    t, mesh = cfg.trainer, run.mesh
    watchdog = Watchdog(limit_s=run.timeout_s + max(10.0, 0.1 * run.timeout_s), rank=mesh.rank)
    out_dir = Path(broadcast_json(str(t.out_dir or default_out_dir)))
    start_step, resume_path, resume_warnings = _resume(run, out_dir, watchdog)
    if mesh.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        truncate_metrics(out_dir, after_step=start_step)  # steps redone after a crash are logged once
    logger = MetricsLogger(
        out_dir, enabled=mesh.rank == 0, wandb_cfg=cfg.logging.wandb, run_config=dataclasses.asdict(cfg)
    )
    params = count_parameters(run.model)
    checkpointer = Checkpointer(
        out_dir,
        keep=t.keep_checkpoints,
        is_async=t.async_checkpoint,
        group=run.checkpoint_group,
        on_task=watchdog.background,
    )
    cadence = Cadence(run, checkpointer=checkpointer, logger=logger, watchdog=watchdog, start_step=start_step)
    logger.console(
        f"moe_dist: world={mesh.world_size} ep={mesh.ep} edp={mesh.edp} device={run.device} | "
        f"params {params['total'] / 1e6:.2f}M total, {params['active'] / 1e6:.2f}M active | "
        f"{run.data.description} | run dir {out_dir} | MFU peak {cadence.peak_description()}"
        + (f" | resumed from {resume_path} at step {start_step}" if resume_path else "")
    )
    for warning in resume_warnings:
        logger.console(warning)

    for step in range(start_step + 1, cadence.last_step + 1):

        def phase(name: str, step: int = step) -> AbstractContextManager:
            return watchdog.phase(step, WATCHDOG_PHASES.get(name, name))

        cadence.after_step(step, train_step(run, step, phase=phase))
    cadence.close(cadence.last_step)
    return out_dir
