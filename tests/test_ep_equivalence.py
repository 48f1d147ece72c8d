"""The expert-parallel MoE layer equals a single-process dense reference (spawned gloo ranks).

Every rank builds the same global layer from one seed and the same global batch; rank r feeds its own
(uneven) slice. The reference computes, for each token, Σ gate·expert(x) with a plain loop over experts on
the whole batch in one process. Compared: outputs, input gradients, router / expert / shared-expert
gradients after sync_gradients, the global grad norm, and the global aux and z losses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import spawn_ranks

from moe_dist import MoEConfig, MoELayer, build_mesh, parallelize_moe, sync_gradients
from moe_dist.parallel.apply import global_grad_norm

DIM, HIDDEN = 16, 8
TOL = 2e-5


@dataclass(frozen=True)
class Case:
    name: str
    ep: int
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    router: str = "softmax"
    norm_topk: bool = True
    force: str = ""  # "one_expert": every token picks expert 3 first; "zero_expert": expert 5 gets nothing
    grouped_mm: str = "on"
    recv_budget: int | None = None  # rows per exchange round; small values force several rounds
    overlap_chunks: int = 1  # chunked EP pipeline (exchanges in flight while the previous chunk computes)


WORLD2 = [
    Case("ep1_top2", ep=1),
    Case("ep2_top1", ep=2, top_k=1),
    Case("ep2_top2", ep=2),
    Case("ep2_top4", ep=2, top_k=4),
    Case("ep2_top2_loop", ep=2, grouped_mm="off"),
    Case("ep2_softmax_before_topk", ep=2, norm_topk=False),
    Case("ep2_sigmoid", ep=2, router="sigmoid"),
    Case("ep2_soft_mixture", ep=2, router="soft"),
    Case("ep2_all_to_one_expert", ep=2, top_k=1, force="one_expert"),
    Case("ep2_all_to_one_expert_top2", ep=2, force="one_expert"),
    Case("ep2_zero_token_expert", ep=2, force="zero_expert"),
    Case("ep2_capacity_drops", ep=2, capacity_factor=0.5),
    Case("ep2_capacity_one_expert", ep=2, top_k=1, capacity_factor=1.0, force="one_expert"),
    Case("ep2_shared_experts", ep=2, num_shared_experts=2),
    Case("ep2_single_local_expert", ep=2, num_experts=2, top_k=1),
    Case("ep2_budget_all_to_one_expert", ep=2, top_k=1, force="one_expert", recv_budget=4),
    Case("ep2_budget_top4", ep=2, top_k=4, recv_budget=9),
    Case("ep2_budget_capacity_shared", ep=2, capacity_factor=0.75, num_shared_experts=1, recv_budget=5),
    Case("ep2_overlap2_top2", ep=2, overlap_chunks=2),
    Case(
        "ep2_overlap3_capacity_shared_loop",
        ep=2,
        capacity_factor=0.75,
        num_shared_experts=1,
        overlap_chunks=3,
        grouped_mm="off",
    ),
    Case("ep2_overlap2_all_to_one_expert", ep=2, top_k=1, force="one_expert", overlap_chunks=2),
    Case("ep2_overlap16_more_chunks_than_tokens", ep=2, top_k=4, overlap_chunks=16),
]
WORLD4 = [
    Case("ep4_top2", ep=4),
    Case("ep2_edp2_top2", ep=2),
    Case("ep2_edp2_capacity_shared", ep=2, capacity_factor=0.75, num_shared_experts=1, top_k=4),
    Case("ep1_edp4_top1", ep=1, top_k=1),
    Case("ep2_edp2_budget_one_expert", ep=2, top_k=2, force="one_expert", recv_budget=3),
    Case("ep4_overlap3_top2", ep=4, overlap_chunks=3),
]


def tokens_per_rank(world_size: int) -> list[int]:
    return [7 + 4 * r for r in range(world_size)]  # deliberately uneven


def build_layer(case: Case) -> MoELayer:
    torch.manual_seed(1000 + len(case.name))
    cfg = MoEConfig(
        num_experts=case.num_experts,
        top_k=case.top_k,
        expert_hidden=HIDDEN,
        capacity_factor=case.capacity_factor,
        router=case.router,
        norm_topk=case.norm_topk and case.top_k > 1,  # top-1 is Switch-style: the raw probability
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        num_shared_experts=case.num_shared_experts,
        grouped_mm=case.grouped_mm,
        recv_budget=case.recv_budget,
        overlap_chunks=case.overlap_chunks,
    )
    layer = MoELayer(DIM, cfg)
    with torch.no_grad():
        layer.router.weight.mul_(20.0)  # spread the scores so that routing is far from ties
        if case.router == "sigmoid":
            layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, case.num_experts))
        if case.force:
            layer.router.weight[:, 0] = 0.0
            layer.router.weight[3 if case.force == "one_expert" else 5, 0] = (
                50.0 if case.force == "one_expert" else -50.0
            )
    return layer


def global_batch(case: Case, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    n = sum(tokens_per_rank(world_size))
    x = torch.randn(n, DIM, generator=gen)
    if case.force:
        x[:, 0] = x[:, 0].abs() + 1.0
    return x, torch.randn(n, DIM, generator=gen)


def reference(layer: MoELayer, x: torch.Tensor, target: torch.Tensor, world_size: int):
    """Single process, whole batch: y_t = Σ_k gate_tk · SwiGLU_{e_tk}(x_t) over kept copies (+ shared)."""
    cfg = layer.cfg
    x = x.clone().requires_grad_(True)
    routing = layer.router(x)
    ids, gates = routing.expert_ids_TK, routing.weights_TK
    keep = torch.ones_like(ids, dtype=torch.bool)
    if cfg.capacity_factor is not None:  # capacity is per rank: cut each rank's slice separately
        start = 0
        for n in tokens_per_rank(world_size):
            capacity = math.ceil(cfg.capacity_factor * n * cfg.top_k / cfg.num_experts)
            for e in range(cfg.num_experts):
                rows, cols = (ids[start : start + n] == e).nonzero(as_tuple=True)
                priority = gates[start + rows, cols].detach().argsort(descending=True, stable=True)
                for j in priority[capacity:]:
                    keep[start + rows[j], cols[j]] = False
            start += n
    w_gate_up, w_down = layer.experts.w_gate_up, layer.experts.w_down
    y = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        gate, up = (x @ w_gate_up[e]).chunk(2, dim=-1)
        expert_out = (F.silu(gate) * up) @ w_down[e]
        weight_T = (gates * ((ids == e) & keep)).sum(dim=-1)
        y = y + weight_T.unsqueeze(-1) * expert_out
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(x)
    loss = (
        (y * target).sum() / len(x) + routing.aux_loss * cfg.aux_loss_coef + routing.z_loss * cfg.z_loss_coef
    )
    loss.backward()
    return y.detach(), x.grad, routing, int((~keep).sum())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


class CountExchanges:
    """Counts the all_to_all_single calls (in flight or not) made while active."""

    def __enter__(self):
        self.calls, self.in_flight, self.original = 0, 0, dist.all_to_all_single

        def counted(*args, async_op=False, **kwargs):
            self.calls += 1
            self.in_flight += bool(async_op)
            return self.original(*args, async_op=async_op, **kwargs)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original


def run_cases(rank: int, world_size: int, cases: list[Case]) -> dict:
    meshes = {}
    results = {}
    for case in cases:
        if case.ep not in meshes:
            meshes[case.ep] = build_mesh(ep=case.ep, num_experts=case.num_experts)
        mesh = meshes[case.ep]
        ref_layer = build_layer(case)
        layer = parallelize_moe(copy.deepcopy(ref_layer), mesh)
        x_all, target_all = global_batch(case, world_size)
        y_ref, x_grad_ref, routing_ref, dropped_ref = reference(ref_layer, x_all, target_all, world_size)

        counts = tokens_per_rank(world_size)
        start = sum(counts[:rank])
        rows = slice(start, start + counts[rank])
        x = x_all[rows].clone().requires_grad_(True)
        with CountExchanges() as exchanges:
            y = layer(x)
            # Each rank's loss is scaled so that the mean over ranks is the global-mean loss.
            loss = (y * target_all[rows]).sum() * world_size / len(x_all) + layer.stats.weighted_loss(
                layer.cfg
            )
            loss.backward()
        sync_gradients(layer, mesh)
        norm = global_grad_norm(layer, mesh)

        first, num_local = mesh.expert_shard(case.num_experts)
        errors = {
            "output": max_err(y, y_ref[rows]),
            # Only this rank's loss depends on its tokens, and it carries a factor world_size.
            "input_grad": max_err(x.grad, world_size * x_grad_ref[rows]),
            "router_grad": max_err(layer.router.weight.grad, ref_layer.router.weight.grad),
            "w_gate_up_grad": max_err(
                layer.experts.w_gate_up.grad, ref_layer.experts.w_gate_up.grad[first : first + num_local]
            ),
            "w_down_grad": max_err(
                layer.experts.w_down.grad, ref_layer.experts.w_down.grad[first : first + num_local]
            ),
        }
        if layer.shared_experts is not None:
            errors["shared_grad"] = max(
                max_err(p.grad, q.grad)
                for p, q in zip(layer.shared_experts.parameters(), ref_layer.shared_experts.parameters())
            )
        ref_norm = torch.stack([p.grad.norm() for p in ref_layer.parameters() if p.grad is not None]).norm()
        errors["grad_norm"] = abs(norm.item() - ref_norm.item()) / ref_norm.item()

        stats = torch.tensor(
            [layer.stats.aux_loss.item(), layer.stats.z_loss.item(), float(layer.stats.num_dropped)],
            dtype=torch.float64,
        )
        budget_use = torch.tensor(
            [layer.stats.exchange_rounds, layer.stats.received_rows or 0], dtype=torch.float64
        )
        dist.all_reduce(budget_use, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats)
        # Relative: forced routing makes the z-loss large (logits of ~50).
        ref_aux, ref_z = routing_ref.aux_loss.item(), routing_ref.z_loss.item()
        errors["aux_loss"] = abs(stats[0].item() / world_size - ref_aux) / max(1.0, ref_aux)
        errors["z_loss"] = abs(stats[1].item() / world_size - ref_z) / max(1.0, ref_z)
        for key in list(errors):
            t = torch.tensor(errors[key], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            errors[key] = t.item()
        results[case.name] = {
            "errors": errors,
            "dropped": int(stats[2].item()),
            "dropped_ref": dropped_ref,
            "counts_ref": routing_ref.counts_E.tolist(),
            "ref_grad_norm": ref_norm.item(),
            "rounds": int(budget_use[0].item()),
            "max_received_rows": int(budget_use[1].item()),
            "exchanges": (exchanges.calls, exchanges.in_flight),
        }
    return results


@pytest.fixture(scope="module")
def world2_results():
    return spawn_ranks(2, run_cases, WORLD2)[0]


@pytest.fixture(scope="module")
def world4_results():
    return spawn_ranks(4, run_cases, WORLD4)[0]


def check(case: Case, result: dict) -> None:
    for key, err in result["errors"].items():
        assert err < TOL, f"{case.name}: {key} differs from the single-process reference by {err:.3g}"
    assert result["ref_grad_norm"] > 1e-3  # the comparison is not between zeros
    assert result["dropped"] == result["dropped_ref"]
    counts = result["counts_ref"]
    if case.capacity_factor is not None:
        assert result["dropped"] > 0, "the capacity cases must actually drop copies"
    if case.force == "one_expert":
        assert counts[3] == sum(tokens_per_rank(4 if case in WORLD4 else 2))
    if case.force == "zero_expert":
        assert counts[5] == 0
    if case.recv_budget is not None:
        assert result["rounds"] > 1, "the budget cases must need several exchange rounds"
        assert 0 < result["max_received_rows"] <= case.recv_budget
    else:
        assert result["rounds"] == 1
    if case.overlap_chunks > 1:  # dispatch and combine per chunk, forward and backward, all in flight
        assert result["exchanges"] == (4 * case.overlap_chunks, 4 * case.overlap_chunks)
    elif case.ep > 1 and case.recv_budget is None:
        assert result["exchanges"] == (4, 0)


@pytest.mark.parametrize("case", WORLD2, ids=lambda c: c.name)
def test_world2_matches_reference(case, world2_results):
    check(case, world2_results[case.name])


@pytest.mark.parametrize("case", WORLD4, ids=lambda c: c.name)
def test_world4_matches_reference(case, world4_results):
    check(case, world4_results[case.name])


def test_naive_per_rank_averaging_would_be_wrong():
    """Guards the test itself: the reference differs from a per-rank-statistics aux loss."""
    case = replace(WORLD2[2], name="guard")
    layer = build_layer(case)
    x, _ = global_batch(case, 2)
    full = layer.router(x).aux_loss
    n0 = tokens_per_rank(2)[0]
    per_rank = (layer.router(x[:n0]).aux_loss + layer.router(x[n0:]).aux_loss) / 2
    assert abs(full.item() - per_rank.item()) > 1e-4
