"""``plan.search=true``: every feasible (ep, engine, micro-batch, activation checkpointing) for the world size and
the GPU, planned and ranked by predicted tokens/s per GPU.

Layouts whose parameters, gradients and optimizer state alone exceed the GPU (a lower bound, by formula) are
skipped without running; for the others the micro-batch grows from 1 until the plan no longer fits (memory
only grows with it). Under skew, the best layout is planned once more with ``model.moe.recv_budget`` set to the
rows a rank receives under uniform routing, to show what the budget does to the worst rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from moe_dist.config import Config
from moe_dist.planning.planner import (
    GiB,
    Plan,
    check_inputs,
    expert_rows,
    make_plan,
    param_counts,
    static_bytes,
)
from moe_dist.planning.routing import skewed_counts

# Engines the planner can run on fake devices (deepspeed needs a real accelerator to initialise).
PLANNABLE_ENGINES = ("native", "fsdp")
CHECKPOINTING = ("none", "moe", "full")


@dataclass
class Candidate:
    ep: int
    engine: str
    micro_batch_size: int
    activation_checkpointing: str
    plan: Plan | None = None
    skipped: str | None = None  # why it was not planned

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits


@dataclass
class SearchResult:
    cfg: Config
    candidates: list[Candidate]
    budget: tuple[Candidate, Plan] | None = None  # the best layout again, with a receive budget
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> list[Candidate]:
        ranked = [c for c in self.candidates if c.fits]
        return sorted(ranked, key=lambda c: -c.plan.tokens_per_s_per_gpu())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Config) -> list[tuple[int, str, str]]:
    """(ep, engine, activation checkpointing) to try, in a fixed order."""
    W, E = cfg.plan.world_size, cfg.model.moe.num_experts
    eps = [d for d in _divisors(W) if (E == 0 and d == 1) or (E > 0 and E % d == 0)]
    return [(ep, engine, ac) for ep in eps for engine in PLANNABLE_ENGINES for ac in CHECKPOINTING]


def _configure(cfg: Config, *, ep: int, engine: str, micro_batch_size: int, ac: str) -> Config:
    trainer = dataclasses.replace(
        cfg.trainer, micro_batch_size=micro_batch_size, activation_checkpointing=ac, accum_steps=None
    )
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, ep=ep),
        engine=dataclasses.replace(cfg.engine, name=engine, zero_stage=0),
        trainer=trainer,
        plan=dataclasses.replace(cfg.plan, search=False),
    )


def search(cfg: Config, *, log=print) -> SearchResult:
    hw = check_inputs(_configure(cfg, ep=1, engine="native", micro_batch_size=1, ac="none"))
    W, gb = cfg.plan.world_size, cfg.trainer.global_batch_size
    if gb % W:
        raise ValueError(f"trainer.global_batch_size={gb}: must be a multiple of plan.world_size={W}")
    usable = hw.memory_bytes * (1 - cfg.plan.headroom)
    dense, expert = param_counts(cfg)
    micro_batches = [mb for mb in (2**i for i in range(int(math.log2(gb // W)) + 1)) if gb % (W * mb) == 0]
    result = SearchResult(cfg, [])
    for ep, engine, ac in candidates(cfg):
        for mb in micro_batches:
            c = Candidate(ep, engine, mb, ac)
            result.candidates.append(c)
            trial = _configure(cfg, ep=ep, engine=engine, micro_batch_size=mb, ac=ac)
            static = static_bytes(trial, dense=dense, expert=expert)
            if static > usable:
                c.skipped = f"parameters, gradients and AdamW state alone need {static / GiB:,.1f} GiB"
                break
            c.plan = make_plan(trial)
            log(
                f"  ep={ep:<3} {engine:<7} micro-batch {mb:<3} checkpointing {ac:<5}: peak "
                f"{c.plan.peak_bytes / GiB:7.2f} GiB, {c.plan.tokens_per_s_per_gpu():10,.0f} tokens/s/GPU"
                + ("" if c.fits else "  (does not fit)")
            )
            if not c.fits:
                break
    if not result.feasible:
        planned = [c for c in result.candidates if c.plan is not None]
        if planned:
            best = min(planned, key=lambda c: c.plan.peak_bytes)
            why = (f"the lowest peak is {best.plan.peak_bytes / GiB:,.1f} GiB (ep={best.ep} {best.engine}, micro-batch "
                   f"{best.micro_batch_size}, checkpointing {best.activation_checkpointing})")  # fmt: skip
        else:
            why = "parameters, gradients and AdamW state alone exceed it in every layout"
        result.notes.append(
            f"nothing fits on {W} x {cfg.plan.gpu} ({usable / GiB:,.1f} GiB usable per GPU): {why}; more GPUs, a "
            "shorter sequence or a larger GPU"
        )
    best = result.feasible[0] if result.feasible else None
    if best is not None and cfg.plan.skew > 1 and best.ep > 1 and cfg.model.moe.num_experts:
        result.budget = (best, _with_budget(best.plan.cfg))
    return result


def _with_budget(cfg: Config) -> Plan:
    """``cfg`` with model.moe.recv_budget = the rows a rank receives per layer under uniform routing."""
    m, ep = cfg.model, cfg.parallel.ep
    tokens = cfg.trainer.micro_batch_size * m.seq_len
    uniform = skewed_counts(tokens=tokens, top_k=m.moe.top_k, num_experts=m.moe.num_experts)
    local = m.moe.num_experts // ep
    budget = ep * sum(uniform[:local])
    moe = dataclasses.replace(m.moe, recv_budget=budget)
    budgeted = dataclasses.replace(cfg, model=dataclasses.replace(m, moe=moe))
    assert expert_rows(budgeted, ep_rank=0, skew=cfg.plan.skew)[1] >= 1
    return make_plan(budgeted)


def render_search(result: SearchResult) -> str:
    cfg = result.cfg
    p = cfg.plan
    lines = [
        f"moe_dist plan search: {p.world_size} x {p.gpu}, {p.gpus_per_node} per node, global batch "
        f"{cfg.trainer.global_batch_size} x {cfg.model.seq_len} tokens, routing "
        + ("uniform" if p.skew == 1 else f"skewed (hottest expert {p.skew:g}x the mean)"),
        "",
        " #  ep  engine  micro  ckpt    peak GiB  headroom   step s  tokens/s/GPU    MFU",
    ]
    for i, c in enumerate(result.feasible, 1):
        plan = c.plan
        lines.append(
            f"{i:>2} {c.ep:>3}  {c.engine:<7} {c.micro_batch_size:>5}  {c.activation_checkpointing:<5} "
            f"{plan.peak_bytes / GiB:>9.2f} {(plan.usable_bytes - plan.peak_bytes) / GiB:>9.2f} "
            f"{plan.step_s():>8.3f} {plan.tokens_per_s_per_gpu():>13,.0f} {plan.mfu():>6.1%}"
        )
    skipped = [c for c in result.candidates if not c.fits]
    if skipped:
        lines += ["", "not feasible:"]
        for c in skipped:
            why = (
                c.skipped
                or f"peak {c.plan.peak_bytes / GiB:,.2f} GiB > {c.plan.usable_bytes / GiB:,.2f} usable"
            )
            lines.append(
                f"   ep={c.ep} {c.engine} micro-batch {c.micro_batch_size} ckpt {c.activation_checkpointing}: {why}"
            )
    if result.budget is not None:
        best, budgeted = result.budget
        hot, hot_b = best.plan.roles[0], budgeted.roles[0]
        lines += [
            "",
            f"receive budget on #1 (model.moe.recv_budget={budgeted.cfg.model.moe.recv_budget} rows, "
            f"{hot_b.exchange_rounds} exchange rounds on the hot layer):",
            f"   hot EP rank peak {hot.peak_bytes / GiB:,.2f} -> {hot_b.peak_bytes / GiB:,.2f} GiB, step "
            f"{best.plan.step_s():.3f} -> {budgeted.step_s():.3f} s, tokens/s/GPU {best.plan.tokens_per_s_per_gpu():,.0f} -> "
            f"{budgeted.tokens_per_s_per_gpu():,.0f}",
        ]
    lines += result.notes
    lines.append(
        "Predictions from fake-device runs and a roofline with stated constants (moe_dist/hardware.py)."
    )
    return "\n".join(lines)


def search_json(result: SearchResult) -> dict:
    from moe_dist.planning.planner import to_json

    return {
        "ranked": [
            {"ep": c.ep, "engine": c.engine, "micro_batch_size": c.micro_batch_size,
             "activation_checkpointing": c.activation_checkpointing, "plan": to_json(c.plan)}
            for c in result.feasible
        ],
        "not_feasible": [
            {"ep": c.ep, "engine": c.engine, "micro_batch_size": c.micro_batch_size,
             "activation_checkpointing": c.activation_checkpointing,
             "why": c.skipped or f"peak {c.plan.peak_bytes} bytes > {c.plan.usable_bytes:.0f} usable"}
            for c in result.candidates if not c.fits
        ],
        "recv_budget": None if result.budget is None else to_json(result.budget[1]),
        "notes": result.notes,
    }  # fmt: skip
