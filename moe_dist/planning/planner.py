"""A plan: the planned ranks' recorded steps, their memory, traffic, FLOPs and step time, and the verdict.

One rank per role is enough: ranks with the same EP position see the same routing (EDP replicas hold the same
experts), so under uniform routing every rank is alike, and under skew the EP rank owning the hottest expert
differs from the others, which are alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from moe_dist.config import Config, batch_layout, validate_plan
from moe_dist.hardware import GPU, Overheads, gpu
from moe_dist.model.build import freeze_parameters
from moe_dist.model.transformer import Transformer, count_parameters, model_flops_per_token
from moe_dist.planning.flops import (
    forward_flops,
    moe_layer_ids,
    recomputed_flops,
    training_flops,
)
from moe_dist.planning.rank import RankTrace, plan_rank, planning_config
from moe_dist.planning.recorder import Collective, Kernel
from moe_dist.planning.roofline import Layout, RankTime, Rates, simulate
from moe_dist.planning.routing import max_skew, planned_counts
from moe_dist.trainer import validate_run

GiB = 2**30


@dataclass
class Role:
    """One planned rank's step in numbers (from its recorded trace, or extrapolated from two depths)."""

    label: str
    rank: int
    ep_rank: int
    micro_batch_size: int
    accum_steps: int
    local_params: int
    peak_bytes: int
    peak_phase: str
    phase_peak: dict[str, int]  # the most bytes live during each step phase
    activations_peak: int  # the most bytes of forward activations live at once
    static: dict[str, int]  # bytes by category once the gradients are reduced
    syncs: dict[str, int]
    counted_flops: int  # per optimizer step, as recorded op by op
    analytic_flops: int  # the same by formula (planning/flops.py)
    expert_rows: list[int]  # rows this rank's experts process per MoE layer and micro-batch
    exchange_rounds: int
    traffic: list[dict]  # per (collective kind, group): calls, bytes, bytes over NVLink / the network
    estimate: RankTime
    roofline: RankTime
    seconds: float  # wall time of the fake runs


@dataclass
class Plan:
    cfg: Config
    gpu_name: str
    gpu: GPU
    roles: list[Role]
    params: dict[str, int]  # global total / active
    tokens_per_step: int
    model_flops_per_token: float
    usable_bytes: float
    depths: list[int]  # layers run on fake GPUs: [n_layers], or two short stacks extrapolated to n_layers
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.roles)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def step_s(self, which: str = "estimate") -> float:
        """Predicted seconds per optimizer step (nan for CPU plans: no roofline)."""
        return max(getattr(r, which).step_s for r in self.roles) or math.nan

    def tokens_per_s_per_gpu(self, which: str = "estimate") -> float:
        return self.tokens_per_step / self.step_s(which) / self.cfg.plan.world_size

    def model_tflops_per_gpu(self, which: str = "estimate") -> float:
        return self.model_flops_per_token * self.tokens_per_s_per_gpu(which) / 1e12

    def mfu(self, which: str = "estimate") -> float:
        return self.model_tflops_per_gpu(which) * 1e12 / self.gpu.peak_flops["bf16"]


def check_inputs(cfg: Config) -> GPU:
    """Every input, before anything runs; ValueError naming the key and the value."""
    validate_plan(cfg.plan)
    hw = gpu(cfg.plan.gpu)
    if cfg.engine.name == "deepspeed":
        raise ValueError(
            "engine.name='deepspeed': cannot be planned: DeepSpeed chooses its accelerator from the real hardware "
            "and moves the model there; plan engine=native (or fsdp), and see docs/DEEPSPEED.md for ZeRO's state"
        )
    validate_run(planning_config(cfg), world_size=cfg.plan.world_size)
    leanest, how = leanest_static_bytes(cfg)
    if leanest > hw.memory_bytes:
        W = cfg.plan.world_size
        raise ValueError(
            f"plan.world_size={W}: this model cannot fit on {W} x {cfg.plan.gpu} at all: its parameters, "
            f"gradients and AdamW state alone need {leanest / GiB:,.1f} GiB per GPU {how}, of "
            f"{hw.memory_bytes / GiB:,.1f} GiB (more GPUs, or a larger GPU)"
        )
    moe = cfg.model.moe
    if moe.num_experts > 0 and moe.router != "soft":
        limit = max_skew(top_k=moe.top_k, num_experts=moe.num_experts)
        if cfg.plan.skew > limit:
            raise ValueError(
                f"plan.skew={cfg.plan.skew}: at most num_experts / top_k = {limit:g} (a token picks an expert once)"
            )
    return hw


def param_counts(cfg: Config) -> tuple[int, int]:
    """(dense, routed expert) parameters of the whole model that train (``trainer.freeze`` left out: the
    bounds below stay lower bounds)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    freeze_parameters(model, cfg.trainer.freeze)
    trained = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    expert = sum(n for name, n in trained if ".experts." in name and ".shared_experts." not in name)
    return sum(n for _, n in trained) - expert, expert


def static_bytes(cfg: Config, *, dense: int, expert: int) -> float:
    """Parameters + gradients + AdamW state per GPU of ``cfg``'s layout (a lower bound: no activations)."""
    W, ep = cfg.plan.world_size, cfg.parallel.ep
    width = 8 if cfg.trainer.precision == "fp64" else 4  # fp32 master weights otherwise
    if cfg.engine.name == "fsdp":
        return 4 * width * (dense + expert) / W
    local = dense + expert / ep
    if cfg.engine.name == "deepspeed" and cfg.engine.zero_stage > 0:
        edp = W // ep
        state = 2 * width * (dense / W + expert / ep / edp)
        grads = width * (dense / W + expert / ep / edp) if cfg.engine.zero_stage == 2 else width * local
        return width * local + grads + state
    return 4 * width * local


def leanest_static_bytes(cfg: Config) -> tuple[float, str]:
    """The least parameter + gradient + AdamW bytes per GPU any layout moe_dist offers reaches at this world
    size, and how (engine=fsdp: everything sharded over the world)."""
    dense, expert = param_counts(cfg)
    W = cfg.plan.world_size
    fsdp = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, name="fsdp"))
    return static_bytes(fsdp, dense=dense, expert=expert), f"fully sharded over {W} GPUs"


def expert_rows(cfg: Config, *, ep_rank: int, skew: float) -> tuple[list[int], int]:
    """(rows this EP rank's experts process per MoE layer and micro-batch, exchange rounds) under the plan's
    routing: every rank routes the same counts (planning/routing.py)."""
    m, ep = cfg.model, cfg.parallel.ep
    layers = moe_layer_ids(m)
    if not layers:
        return [], 1
    tokens = batch_layout(cfg.trainer, world_size=cfg.plan.world_size)[0] * m.seq_len
    top_k = m.moe.num_experts if m.moe.router == "soft" else m.moe.top_k
    capacity = None
    if m.moe.capacity_factor is not None:
        capacity = math.ceil(Fraction(repr(m.moe.capacity_factor)) * tokens * top_k / m.moe.num_experts)
    (row,) = planned_counts(  # chunking (model.moe.overlap_chunks) changes no total
        tokens=tokens, chunks=1, top_k=top_k, num_experts=m.moe.num_experts, skew=skew, capacity=capacity
    )
    local = m.moe.num_experts // ep
    received = [ep * sum(row[q * local : (q + 1) * local]) for q in range(ep)]
    rounds = 1
    if m.moe.recv_budget is not None and ep > 1:
        rounds = max(1, -(-max(received) // m.moe.recv_budget))
    return [received[ep_rank]] * len(layers), rounds


def plan_roles(cfg: Config) -> list[tuple[int, str]]:
    ep, skew = cfg.parallel.ep, cfg.plan.skew
    if ep > 1 and skew > 1:
        return [(0, "hot EP rank"), (ep - 1, "other EP ranks")]
    return [(0, "every rank")]


def plan_depths(cfg: Config) -> list[int]:
    """Layers to run: all of them, or (plan.depth=auto, deep models) two short stacks of whole layer periods
    (MoE every n-th layer), whose difference is one period: every per-step quantity is then a + b·layers."""
    n, period = cfg.model.n_layers, cfg.model.moe.every_n_layers if cfg.model.moe.num_experts else 1
    checkpointing = cfg.trainer.activation_checkpointing
    if checkpointing.startswith("every_n:"):  # checkpointed blocks repeat with their own period
        period = math.lcm(period, int(checkpointing.partition(":")[2]))
    if cfg.plan.depth == "full" or n <= 4 * period:
        return [n]
    return [period, 2 * period]


def _run_roles(
    cfg: Config, hw: GPU, overheads: Overheads, replay: dict[int, list] | None = None
) -> list[Role]:
    """Runs every role at ``cfg.model.n_layers`` and replays their steps together."""
    roles = plan_roles(cfg) if replay is None else [(rank, f"rank {rank}") for rank in sorted(replay)]
    traces = [
        (label, plan_rank(cfg, rank=rank, gpu=hw, skew=cfg.plan.skew, replay=replay and replay[rank]))
        for rank, label in roles
    ]
    layout = Layout(cfg.plan.world_size, cfg.plan.gpus_per_node)
    ranks = [t.rank for _, t in traces]
    times = {}
    for which, derated in (("estimate", True), ("roofline", False)):
        if cfg.plan.device != "cuda":  # no roofline for CPU jobs
            times[which] = [RankTime() for _ in traces]
            continue
        rates = Rates(hw, derated=derated, overheads=overheads)
        times[which] = simulate([t.events for _, t in traces], ranks=ranks, layout=layout, rates=rates)
    roles = []
    for i, (label, trace) in enumerate(traces):
        rows, rounds = expert_rows(cfg, ep_rank=trace.ep_rank, skew=cfg.plan.skew)
        roles.append(_summarise(trace, cfg, label, rows, rounds, times["estimate"][i], times["roofline"][i]))
    return roles


def analytic_flops(cfg: Config, micro_batch_size: int, accum_steps: int, rows: list[int], rounds: int) -> int:
    """One optimizer step of one rank by formula (planning/flops.py), counted convention."""
    forward = forward_flops(cfg.model, batch=micro_batch_size, expert_rows=rows)
    checkpointing = cfg.trainer.activation_checkpointing
    recomputed = recomputed_flops(forward, cfg.model, checkpointing=checkpointing, rounds=rounds)
    frozen = tuple(cfg.trainer.freeze)
    return accum_steps * training_flops(forward, recomputed=recomputed, frozen=frozen)


def _summarise(trace: RankTrace, cfg: Config, label, rows, rounds, estimate, roofline) -> Role:
    return Role(
        label=label,
        rank=trace.rank,
        ep_rank=trace.ep_rank,
        micro_batch_size=trace.micro_batch_size,
        accum_steps=trace.accum_steps,
        local_params=trace.local_params,
        peak_bytes=trace.memory.peak,
        peak_phase=trace.memory.peak_phase,
        phase_peak=dict(trace.memory.phase_peak),
        activations_peak=trace.memory.category_peak.get("activations", 0),
        static=dict(trace.static),
        syncs=dict(trace.syncs),
        counted_flops=sum(e.flops for e in trace.events if isinstance(e, Kernel)),
        analytic_flops=analytic_flops(cfg, trace.micro_batch_size, trace.accum_steps, rows, rounds),
        expert_rows=rows,
        exchange_rounds=rounds,
        traffic=traffic(trace, cfg),
        estimate=estimate,
        roofline=roofline,
        seconds=trace.seconds,
    )


def _extrapolate(short: Role, long: Role, *, depths: list[int], cfg: Config) -> Role:
    """``short`` and ``long`` ran ``depths`` layers; every per-step quantity is linear in the layer count."""
    f = (cfg.model.n_layers - depths[0]) / (depths[1] - depths[0])

    def lerp(a, b):
        if isinstance(a, dict):
            return {k: lerp(a.get(k, 0), b.get(k, 0)) for k in a.keys() | b.keys()}
        if isinstance(a, RankTime):
            return RankTime(
                **{k.name: lerp(getattr(a, k.name), getattr(b, k.name)) for k in dataclasses.fields(a)}
            )
        value = a + (b - a) * f
        return round(value) if isinstance(a, int) and isinstance(b, int) else value

    phase_peak = lerp(short.phase_peak, long.phase_peak)
    peak_phase = max(phase_peak, key=phase_peak.get)
    rows, rounds = expert_rows(cfg, ep_rank=short.ep_rank, skew=cfg.plan.skew)
    by_key = {(r["kind"], r["group"]): r for r in long.traffic}
    return dataclasses.replace(
        long,
        local_params=lerp(short.local_params, long.local_params),
        peak_bytes=phase_peak[peak_phase],
        peak_phase=peak_phase,
        phase_peak=phase_peak,
        activations_peak=lerp(short.activations_peak, long.activations_peak),
        static=lerp(short.static, long.static),
        syncs=lerp(short.syncs, long.syncs),
        counted_flops=lerp(short.counted_flops, long.counted_flops),
        analytic_flops=analytic_flops(cfg, short.micro_batch_size, short.accum_steps, rows, rounds),
        expert_rows=rows,
        traffic=[
            {**row, **lerp(_counts(row), _counts(by_key[row["kind"], row["group"]]))} for row in short.traffic
        ],
        estimate=lerp(short.estimate, long.estimate),
        roofline=lerp(short.roofline, long.roofline),
        seconds=short.seconds + long.seconds,
    )


def _counts(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, int)}


def make_plan(
    cfg: Config, *, overheads: Overheads | None = None, replay: dict[int, list[list[int]]] | None = None
) -> Plan:
    """Runs one optimizer step per role on fake GPUs and turns the recordings into a plan. ``replay``: per
    rank, the routing counts a real run read (then those ranks are planned, at full depth, with that routing)."""
    hw = check_inputs(cfg)
    overheads = overheads or Overheads()
    depths = plan_depths(cfg) if replay is None else [cfg.model.n_layers]
    runs = [
        _run_roles(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=d)), hw, overheads, replay
        )
        for d in depths
    ]
    roles = runs[0] if len(runs) == 1 else [_extrapolate(a, b, depths=depths, cfg=cfg) for a, b in zip(*runs)]
    with torch.device("meta"):
        meta_model = Transformer(cfg.model)
    params = count_parameters(meta_model)
    notes = []
    if len(depths) == 2:
        notes.append(
            f"depth: ran {depths[0]} and {depths[1]} of the {cfg.model.n_layers} layers on fake GPUs and extrapolated "
            "linearly (plan.depth=full runs them all)"
        )
    return Plan(
        cfg=cfg,
        gpu_name=cfg.plan.gpu,
        gpu=hw,
        roles=roles,
        params=params,
        tokens_per_step=cfg.trainer.global_batch_size * cfg.model.seq_len,
        model_flops_per_token=model_flops_per_token(meta_model),  # MFU's own count (moe_dist/mfu.py)
        usable_bytes=hw.memory_bytes * (1 - cfg.plan.headroom),
        depths=depths,
        notes=notes,
    )


# ---- traffic ----------------------------------------------------------------------------------------------


def group_name(ranks: tuple[int, ...], *, rank: int, cfg: Config) -> str:
    world, ep = cfg.plan.world_size, cfg.parallel.ep
    ep_rank, edp_rank = rank % ep, rank // ep
    if ranks == tuple(edp_rank * ep + i for i in range(ep)):
        return "ep" if ep < world else "ep=world"
    if ranks == tuple(range(ep_rank, world, ep)):
        return "edp" if ep > 1 else "world"
    return "world" if len(ranks) == world else f"{len(ranks)} ranks"


def traffic(trace: RankTrace, cfg: Config) -> list[dict]:
    """Per (collective kind, group): calls, bytes, and how many of this rank's bytes cross NVLink and the
    network (all_to_all: what it sends to and receives from its peers; others: the collective's size, on the
    link class its group spans)."""
    layout = Layout(cfg.plan.world_size, cfg.plan.gpus_per_node)
    me = trace.rank
    rows: dict[tuple[str, str], dict] = defaultdict(
        lambda: {
            "calls": 0,
            "bytes": 0,
            "recv_bytes": 0,
            "nvlink_bytes": 0,
            "network_bytes": 0,
            "overlapped_calls": 0,
        }
    )
    for c in trace.events:
        if not isinstance(c, Collective) or len(c.group) == 1:
            continue
        row = rows[(c.kind, group_name(c.group, rank=me, cfg=cfg))]
        row["calls"] += 1
        row["overlapped_calls"] += int(c.side)
        if c.kind == "all_to_all" and c.send_to:
            sent = {r: b for r, b in c.send_to.items() if r != me}
            row["bytes"] += sum(sent.values())
            row["recv_bytes"] += sum(b for r, b in c.recv_from.items() if r != me)
            row["nvlink_bytes"] += sum(b for r, b in sent.items() if layout.node(r) == layout.node(me))
            row["network_bytes"] += sum(b for r, b in sent.items() if layout.node(r) != layout.node(me))
        else:
            row["bytes"] += c.nbytes
            row["recv_bytes"] += c.nbytes
            spans_nodes = len({layout.node(r) for r in c.group}) > 1
            row["network_bytes" if spans_nodes else "nvlink_bytes"] += c.nbytes
    return [{"kind": k, "group": g, **v} for (k, g), v in sorted(rows.items())]


# ---- output -----------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _flops(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:,.4g} {unit}"
    return f"{n:,.0f} "


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f}"


def render(plan: Plan) -> str:
    cfg, m, t, p = plan.cfg, plan.cfg.model, plan.cfg.trainer, plan.cfg.plan
    W, ep = p.world_size, cfg.parallel.ep
    nodes = max(1, W // p.gpus_per_node)
    first = plan.roles[0]
    columns = "".join(f"{r.label:>22}" for r in plan.roles)
    lines = [
        f"moe_dist plan: {W} x {plan.gpu.name} ({nodes} node{'s' * (nodes > 1)} of {min(W, p.gpus_per_node)} GPUs), "
        f"ep={ep} edp={W // ep}, engine={cfg.engine.name}",
        f"model: {plan.params['total'] / 1e9:,.3f} B parameters, {plan.params['active'] / 1e9:,.3f} B active per "
        f"token (d={m.dim}, {m.n_layers} layers, {m.n_heads} heads, {m.moe.num_experts} experts top-{m.moe.top_k}, "
        f"vocab {m.vocab_size}, seq {m.seq_len})",
        f"batch: {t.global_batch_size} sequences = {plan.tokens_per_step:,} tokens per step; per GPU "
        f"{first.micro_batch_size} sequences x {first.accum_steps} micro-steps; routing "
        + ("uniform" if p.skew == 1 else f"skewed (hottest expert {p.skew:g}x the mean)"),
        "",
        f"memory per GPU (GiB)    {columns}",
    ]
    for key, label in (("parameters", "parameters"), ("gradients", "gradients"),
                       ("optimizer_state", "optimizer state")):  # fmt: skip
        lines.append(f"  {label:<22}" + "".join(f"{_gib(r.static.get(key, 0)):>22}" for r in plan.roles))
    lines.append("  activations (peak)    " + "".join(f"{_gib(r.activations_peak):>22}" for r in plan.roles))
    lines.append(
        "  peak                  "
        + "".join(f"{_gib(r.peak_bytes) + ' ' + r.peak_phase:>22}" for r in plan.roles)
    )
    headroom = plan.usable_bytes - plan.peak_bytes
    lines.append(
        f"  fits: {'yes' if plan.fits else 'NO'}, peak {_gib(plan.peak_bytes)} of {_gib(plan.usable_bytes)} GiB usable "
        f"({plan.gpu.memory_bytes / 1e9:.0f} GB less plan.headroom={p.headroom:g}): {_gib(headroom)} GiB "
        + ("to spare" if headroom >= 0 else "short")
    )
    lines += ["", f"per GPU per step        {columns}"]
    lines.append("  FLOPs counted         " + "".join(f"{_flops(r.counted_flops):>22}" for r in plan.roles))
    lines.append("  FLOPs by formula      " + "".join(f"{_flops(r.analytic_flops):>22}" for r in plan.roles))
    lines.append("  kernels               " + "".join(f"{r.estimate.num_kernels:>22,}" for r in plan.roles))
    lines.append("  host syncs            " + "".join(f"{sum(r.syncs.values()):>22}" for r in plan.roles))
    lines.append("    " + ", ".join(f"{k}: {v}" for k, v in sorted(first.syncs.items())))
    lines += ["", f"collectives per step ({first.label})",
              "  kind            group     calls   bytes sent   bytes recv   sent over NVLink / network"]  # fmt: skip
    for row in first.traffic:
        lines.append(
            f"  {row['kind']:<15} {row['group']:<8} {row['calls']:>6} {_bytes(row['bytes']):>12} "
            f"{_bytes(row['recv_bytes']):>12} {_bytes(row['nvlink_bytes']):>14} / {_bytes(row['network_bytes'])}"
            + (f"  ({row['overlapped_calls']} overlapped)" if row["overlapped_calls"] else "")
        )
    if p.device != "cuda":
        lines += ["", "plan.device=cpu: no step time (the roofline models GPUs)."]
    else:
        lines += _render_time(plan)
    lines += [
        "",
        f"planned in {sum(r.seconds for r in plan.roles):.1f} s: {len(plan.roles)} of {W} ranks ran the training "
        "step on fake devices (ranks with the same EP position see the same routing)",
        *plan.notes,
        "These are predictions from fake-device runs and a roofline with stated constants (moe_dist/hardware.py), "
        "not measurements.",
    ]
    return "\n".join(lines)


def _render_time(plan: Plan) -> list[str]:
    est, roof = _slowest(plan, "estimate"), _slowest(plan, "roofline")
    lines = ["", "step time (ms)                estimate    roofline"]
    lines.append(
        f"  step                    {_ms(plan.step_s('estimate')):>12}{_ms(plan.step_s('roofline')):>12}"
    )
    lines.append(f"  compute (kernels)       {_ms(est.compute_s):>12}{_ms(roof.compute_s):>12}")
    for kind in sorted(set(est.comm_exposed_s) | set(roof.comm_exposed_s)):
        lines.append(
            f"  {kind + ' exposed':<24}{_ms(est.comm_exposed_s.get(kind, 0)):>12}{_ms(roof.comm_exposed_s.get(kind, 0)):>12}"
        )
    lines.append(f"  waiting for other ranks {_ms(est.imbalance_s):>12}{_ms(roof.imbalance_s):>12}")
    lines.append(f"  GPU idle, host-bound    {_ms(est.host_bound_s):>12}{_ms(roof.host_bound_s):>12}")
    lines.append(
        f"  tokens/s per GPU        {plan.tokens_per_s_per_gpu('estimate'):>12,.0f}"
        f"{plan.tokens_per_s_per_gpu('roofline'):>12,.0f}"
    )
    lines.append(
        f"  model TFLOP/s per GPU   {plan.model_tflops_per_gpu('estimate'):>12,.1f}"
        f"{plan.model_tflops_per_gpu('roofline'):>12,.1f}"
    )
    lines.append(f"  MFU (bf16 peak)         {plan.mfu('estimate'):>12.1%}{plan.mfu('roofline'):>12.1%}")
    return lines


def _slowest(plan: Plan, which: str) -> RankTime:
    """The role whose own work is longest (the others wait for it): the breakdown to show."""
    return max((getattr(r, which) for r in plan.roles), key=lambda t: t.step_s - t.imbalance_s)


def _time_json(t: RankTime) -> dict:
    return {
        f.name: (dict(v) if isinstance(v := getattr(t, f.name), dict) else v) for f in dataclasses.fields(t)
    }


def to_json(plan: Plan) -> dict:
    return {
        "world_size": plan.cfg.plan.world_size,
        "gpus_per_node": plan.cfg.plan.gpus_per_node,
        "gpu": plan.gpu_name,
        "ep": plan.cfg.parallel.ep,
        "engine": plan.cfg.engine.name,
        "micro_batch_size": plan.roles[0].micro_batch_size,
        "skew": plan.cfg.plan.skew,
        "depths": plan.depths,
        "params": plan.params,
        "tokens_per_step": plan.tokens_per_step,
        "fits": plan.fits,
        "peak_bytes": plan.peak_bytes,
        "usable_bytes": plan.usable_bytes,
        "step_s": {w: plan.step_s(w) for w in ("estimate", "roofline")},
        "tokens_per_s_per_gpu": {w: plan.tokens_per_s_per_gpu(w) for w in ("estimate", "roofline")},
        "model_tflops_per_gpu": {w: plan.model_tflops_per_gpu(w) for w in ("estimate", "roofline")},
        "mfu": {w: plan.mfu(w) for w in ("estimate", "roofline")},
        "roles": [
            {
                **{
                    f.name: getattr(r, f.name)
                    for f in dataclasses.fields(r)
                    if f.name not in ("estimate", "roofline")
                },
                "estimate": _time_json(r.estimate),
                "roofline": _time_json(r.roofline),
            }
            for r in plan.roles
        ],
    }
