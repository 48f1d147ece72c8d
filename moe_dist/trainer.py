"""The training loop, top to bottom: set-up, steps (accumulate → sync → clip → step), eval, checkpoints."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from moe_dist.checkpoint import load_checkpoint, save_checkpoint, select_checkpoint
from moe_dist.config import Config, validate
from moe_dist.data import TokenSplits, load_tokens, rank_batch
from moe_dist.distributed import broadcast_json, collective_timeout_s, env_world_size, init_distributed
from moe_dist.engine import build_engine
from moe_dist.guards import CollapseDetector, NonFiniteGuard, Watchdog
from moe_dist.metrics import MetricsLogger, truncate_metrics
from moe_dist.model.transformer import Transformer, count_parameters
from moe_dist.moe.layer import MoELayer
from moe_dist.optim import lr_at
from moe_dist.parallel.apply import parallelize_moe
from moe_dist.parallel.mesh import Mesh, build_mesh

EVAL_SEED_OFFSET = 7_919  # eval batches come from (seed + offset, i): never the training draws


def build_model(cfg: Config, mesh: Mesh, device: torch.device) -> Transformer:
    """Single-device model on the meta device → sharded by the mesh → materialised → seeded init."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallelize_moe(model, mesh)
    model.to_empty(device=device)
    model.init_weights(cfg.trainer.seed)
    if cfg.model.init_from:
        from moe_dist.hf import init_from_hf

        init_from_hf(model, cfg.model.init_from, mesh)
    return model


def step_seed(seed: int, step: int, rank: int) -> int:
    """Stateless RNG (noisy gating): a function of (seed, step, rank), so resuming needs no RNG state."""
    return seed * 1_000_003 + step * 65_537 + rank


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class StepStats:
    """Device-side sums over the micro-batches of one step; one all-reduce and one host copy when read."""

    def __init__(self, model: Transformer, device: torch.device):
        self.num_layers = sum(1 for _ in model.moe_layers())
        self.num_experts = model.cfg.moe.num_experts
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [ce, aux, z, dropped, copies, micro-batches] then counts [layers x experts]
        self.scalars = torch.zeros(6, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=self.device)
        self.exchange_rounds = 1  # the most rounds a layer needed (recv_budget); the same on every rank

    def add(self, ce: torch.Tensor, model: Transformer) -> None:
        layers = list(model.moe_layers())
        aux = sum((m.stats.aux_loss.detach() for m in layers), torch.zeros((), device=self.device))
        z = sum((m.stats.z_loss.detach() for m in layers), torch.zeros((), device=self.device))
        dropped = sum(m.stats.num_dropped for m in layers)
        copies = sum(m.stats.num_copies for m in layers)
        self.scalars += torch.stack(
            [ce.detach().double(), aux.double(), z.double(), *ce.new_tensor([dropped, copies, 1]).double()]
        )
        for i, m in enumerate(layers):
            self.counts[i] += m.stats.counts_E
        self.exchange_rounds = max([self.exchange_rounds] + [m.stats.exchange_rounds for m in layers])

    def all_reduce(self, mesh: Mesh) -> None:
        if mesh.world_group is not None:
            flat = torch.cat([self.scalars, self.counts.reshape(-1)])
            dist.all_reduce(flat, group=mesh.world_group)
            self.scalars, self.counts = flat[:6], flat[6:].view_as(self.counts)

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


def lm_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


@torch.no_grad()
def evaluate(model: Transformer, data: TokenSplits, cfg: Config, mesh: Mesh, device, autocast) -> float:
    model.eval()
    t, total = cfg.trainer, torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(t.eval_batches):
        inputs, targets = rank_batch(
            data.val,
            seed=t.seed + EVAL_SEED_OFFSET,
            step=i,
            global_batch_size=t.global_batch_size,
            seq_len=cfg.model.seq_len,
            rank=mesh.rank,
            world_size=mesh.world_size,
        )
        for mb_in, mb_tg in zip(inputs.split(t.micro_batch_size), targets.split(t.micro_batch_size)):
            with autocast:
                total += torch.stack(
                    [lm_loss(model, mb_in.to(device), mb_tg.to(device)).double(), total.new_ones(())]
                )
    if mesh.world_group is not None:
        dist.all_reduce(total, group=mesh.world_group)
    model.train()
    return (total[0] / total[1]).item()


def train(cfg: Config, *, default_out_dir: str) -> Path:
    """Runs (or resumes) training; returns the run directory. Every rank calls it."""
    world_size = env_world_size()
    validate(cfg, world_size=world_size)  # user errors surface here, before any collective or file write
    t, mcfg = cfg.trainer, cfg.model
    data = load_tokens(cfg.data, vocab_size=mcfg.vocab_size, seq_len=mcfg.seq_len)
    device = resolve_device(cfg)
    backend = (
        cfg.parallel.backend
        if cfg.parallel.backend != "auto"
        else ("nccl" if device.type == "cuda" else "gloo")
    )
    device = init_distributed(backend=backend, timeout_s=cfg.parallel.timeout_s)
    mesh = build_mesh(ep=cfg.parallel.ep, num_experts=mcfg.moe.num_experts)
    timeout_s = collective_timeout_s(backend, cfg.parallel.timeout_s)
    watchdog = Watchdog(limit_s=timeout_s + max(10.0, 0.1 * timeout_s), rank=mesh.rank)
    out_dir = Path(broadcast_json(str(t.out_dir or default_out_dir)))
    is_main = mesh.rank == 0
    # Rank 0 picks (and verifies) the checkpoint; every rank gets the same answer or the same error.
    choice = {"path": None, "warnings": [], "error": None}
    if is_main:
        try:
            choice["path"], choice["warnings"] = select_checkpoint(t.resume, out_dir)
        except ValueError as err:
            choice["error"] = str(err)
    choice = broadcast_json(choice)
    if choice["error"]:
        raise ValueError(choice["error"])

    model = build_model(cfg, mesh, device)
    engine = build_engine(model, engine=cfg.engine, trainer=t, mesh=mesh)
    model_cfg = dataclasses.asdict(mcfg)
    start_step = 0
    if choice["path"] is not None:
        with watchdog.phase(0, f"loading checkpoint {choice['path']}"):
            slots = engine.optimizer_slots()
            meta = load_checkpoint(
                choice["path"], model=model, optimizer_slots=slots, mesh=mesh, model_cfg=model_cfg
            )
            engine.load_optimizer_slots(slots)
            start_step = meta["step"]
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        truncate_metrics(out_dir, after_step=start_step)  # steps redone after a crash are logged once

    logger = MetricsLogger(
        out_dir, enabled=is_main, wandb_cfg=cfg.logging.wandb, run_config=dataclasses.asdict(cfg)
    )
    params = count_parameters(model)
    logger.console(
        f"moe_dist: world={mesh.world_size} ep={mesh.ep} edp={mesh.edp} device={device} | "
        f"params {params['total'] / 1e6:.2f}M total, {params['active'] / 1e6:.2f}M active | {data.description} | "
        f"run dir {out_dir}"
        + (f" | resumed from {choice['path']} at step {start_step}" if choice["path"] else "")
    )
    for warning in choice["warnings"]:
        logger.console(warning)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    accum_steps = t.global_batch_size // (mesh.world_size * t.micro_batch_size)
    tokens_per_step = t.global_batch_size * mcfg.seq_len
    stats = StepStats(model, device)
    nonfinite = NonFiniteGuard(t.max_nonfinite_skips)
    moe_names = [name for name, m in model.named_modules() if isinstance(m, MoELayer)]
    collapse = CollapseDetector(
        moe_names, mcfg.moe.num_experts, warn_after=t.collapse_warn_steps, device=device
    )
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not (is_main and t.progress_bar), leave=False)
    window_start, window_steps, last_load = time.perf_counter(), 0, []
    last_step = t.stop_at_step or t.max_steps
    for step in range(start_step + 1, last_step + 1):
        engine.set_lr(lr_at(step, t))
        torch.manual_seed(step_seed(t.seed, step, mesh.rank))
        inputs, targets = rank_batch(
            data.train,
            seed=t.seed,
            step=step,
            global_batch_size=t.global_batch_size,
            seq_len=mcfg.seq_len,
            rank=mesh.rank,
            world_size=mesh.world_size,
        )
        with watchdog.phase(
            step, "forward/backward (MoE all-to-all dispatch and combine, router all-reduce)"
        ):
            for i in range(accum_steps):
                rows = slice(i * t.micro_batch_size, (i + 1) * t.micro_batch_size)
                with autocast:
                    ce = lm_loss(model, inputs[rows].to(device), targets[rows].to(device))
                    loss = (ce + model.moe_loss()) / accum_steps
                engine.backward(loss, last_micro_batch=i == accum_steps - 1)
                stats.add(ce, model)
        with watchdog.phase(step, "gradient all-reduce (dense over world, experts over EDP)"):
            grad_norm = engine.reduce_gradients()
        skip_message = nonfinite.should_skip(step=step, grad_norm=grad_norm.item(), model=model)  # host sync
        if skip_message is None:
            engine.step(grad_norm, max_norm=t.grad_clip)
        else:
            logger.console(skip_message)
        engine.zero_grad()
        with watchdog.phase(step, "expert-count all-reduce"):
            stats.all_reduce(mesh)  # global expert counts: the same on every rank
        if skip_message is None:
            for layer, counts_E in zip(model.moe_layers(), stats.counts):
                layer.router.update_bias(counts_E)
            collapse.update(stats.counts)
        window_steps += 1
        bar.update(1)

        if step % t.log_every == 0 or step == last_step:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, **stats.record(), "lr": lr_at(step, t), "grad_norm": grad_norm.item()}
            record["tokens_per_s"] = tokens_per_step * window_steps / elapsed
            record["skipped_steps"] = nonfinite.skipped
            logger.log(record)
            logger.console(
                f"step {step:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad_norm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:,.0f} | "
                f"aux {record['aux_loss']:.4f} | dropped {record['dropped_frac']:.3f} | "
                f"max load {max((max(r) for r in record['expert_load']), default=0):.3f}"
            )
            for warning in collapse.new_warnings():
                logger.console(warning)
            window_start, window_steps = time.perf_counter(), 0
            last_load = record["expert_load"]
        stats.reset()

        if t.eval_every and (step % t.eval_every == 0 or step == last_step):
            with watchdog.phase(step, "evaluation (forward all-to-all, loss all-reduce)"):
                val_loss = evaluate(model, data, cfg, mesh, device, autocast)
            logger.log({"step": step, "val_loss": val_loss})
            logger.console(f"step {step:>6} | val_loss {val_loss:.4f}")
            logger.log_expert_heatmap(step, last_load)
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == last_step:
            with watchdog.phase(step, "checkpoint save (barriers around the DCP write)"):
                path = save_checkpoint(
                    out_dir,
                    step=step,
                    model=model,
                    optimizer_slots=engine.optimizer_slots(),
                    mesh=mesh,
                    meta={
                        "model": model_cfg,
                        "seed": t.seed,
                        "data": data.description,
                        "engine": cfg.engine.name,
                    },
                    keep=t.keep_checkpoints,
                )
            logger.console(f"step {step:>6} | checkpoint {path}")
    bar.close()
    logger.close()
    return out_dir
