"""Turns a built single-device model into an EP x DP model, and the gradient semantics that go with it.

Loss convention: every rank computes its loss so that the mean over the W ranks is the global-mean loss
(equal local batches: the local mean). Then:
- dense parameters (replicated on all ranks): all-reduce sum over the world, divide by W;
- expert parameters (one shard per EP rank, replicated over EDP): the backward all-to-all has already
  summed the contributions of every rank in the EP group, so all-reduce sum over EDP covers all W ranks,
  and the divisor is W as well (not edp: averaging over EDP alone would leave them ep times too large).
Each gradient then equals the single-device gradient of the global-mean loss.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.moe.dispatch import TokenDispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.mesh import Mesh

BUCKET_NUMEL = 1 << 24  # elements per flattened all-reduce bucket


def parallelize_moe(model: nn.Module, mesh: Mesh) -> nn.Module:
    """Shards the experts of every MoELayer in ``model`` over the mesh's EP group (in place).

    Works on real or meta tensors: the local shard keeps the global expert ids
    [ep_rank·L, (ep_rank+1)·L), so weights initialised from a seed per global expert are the same global
    weights at every EP degree.
    """
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        experts: GroupedExperts = layer.experts
        num_experts = layer.cfg.num_experts
        if experts.num_local_experts != num_experts:
            raise RuntimeError("parallelize_moe: this model's experts are already sharded")
        first, num_local = mesh.expert_shard(num_experts)
        for name in ("w_gate_up", "w_down"):
            full = getattr(experts, name)
            shard = full.detach()[first : first + num_local].clone()
            setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        experts.expert_offset = first
        layer.dispatcher = TokenDispatcher(
            num_experts,
            group=mesh.ep_group,
            ep=mesh.ep,
            recv_budget=layer.cfg.recv_budget,
            overlap_chunks=layer.cfg.overlap_chunks,
        )
        layer.router.dp_group, layer.router.dp_size = mesh.world_group, mesh.world_size
    return model


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, expert parameters), each in a fixed order that is the same on all ranks."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


def _all_reduce_grads(params: list[nn.Parameter], group, divisor: int) -> None:
    grads = []
    for p in params:
        if p.grad is None:  # every rank must contribute the same buffers, used or not
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if group is not None:
        bucket: list[torch.Tensor] = []
        numel = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            numel += g.numel()
            if numel >= BUCKET_NUMEL or i == len(grads) - 1:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                for b, synced in zip(bucket, flat.split([b.numel() for b in bucket])):
                    b.copy_(synced.view_as(b))
                bucket, numel = [], 0
    if divisor != 1 and grads:  # a dense model has no expert gradients at all
        torch._foreach_div_(grads, divisor)


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh: Mesh) -> None:
    """Makes every gradient the single-device gradient of the global-mean loss (see module doc)."""
    dense, expert = split_parameters(model)
    _all_reduce_grads(dense, mesh.world_group, mesh.world_size)
    _all_reduce_grads(expert, mesh.edp_group, mesh.world_size)


class OverlappedGradSync:
    """``sync_gradients`` overlapped with backward: gradient buckets are all-reduced in flight while backward
    still runs (the native engine's default; ``engine.overlap_grad_sync``).

    Buckets hold parameters in reverse registration order (about the order in which backward finishes them),
    dense ones over the world and expert ones over EDP, at most ``bucket_numel`` elements each. While
    ``armed`` (the last micro-batch's backward), a post-accumulate-grad hook marks a parameter ready; a bucket
    is launched once it is ready and every bucket before it has been launched, so every rank issues the
    same collectives in the same order whatever its own timing. ``launch_remaining()``, right after that
    backward, sends the rest (unused parameters contribute zeros, as in ``sync_gradients``), so that any
    collective issued later follows all buckets on every rank; ``finish()`` waits, writes the sums back and
    divides by the world size. Same sums
    and divisions as ``sync_gradients``: equal to the bit at world 2 (tested), equal up to the order of the
    collective's additions at larger worlds.
    """

    def __init__(self, model: nn.Module, mesh: Mesh, *, bucket_numel: int):
        self.mesh, self.armed = mesh, False
        dense, expert = split_parameters(model)
        self.params = dense + expert
        groups = {id(p): mesh.world_group for p in dense} | {id(p): mesh.edp_group for p in expert}
        self.buckets: list[list[nn.Parameter]] = []
        self.bucket_groups: list[dist.ProcessGroup] = []
        self.bucket_of: dict[int, int] = {}
        for p in reversed(list(model.parameters())):
            group = groups.get(id(p))
            if group is None:  # not trained, or nothing to reduce (ep == world for experts)
                continue
            last = self.buckets[-1] if self.buckets else None
            if last is None or self.bucket_groups[-1] is not group or _numel(last) + p.numel() > bucket_numel:
                self.buckets.append([])
                self.bucket_groups.append(group)
            self.buckets[-1].append(p)
            self.bucket_of[id(p)] = len(self.buckets) - 1
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]
        self._reset()

    def _reset(self) -> None:
        self.waiting = [len(b) for b in self.buckets]  # parameters not yet ready, per bucket
        self.in_flight: list[tuple[torch.Tensor, dist.Work]] = []
        self.launched_in_backward = 0  # buckets that went out before finish(): what can overlap
        self.wait_s = 0.0  # host seconds finish() spent waiting for the all-reduces (exposed communication)

    def arm(self) -> None:
        """The next backward is the step's last: reduce while it runs."""
        self._reset()
        self.armed = True

    def _ready(self, p: nn.Parameter) -> None:
        i = self.bucket_of.get(id(p))
        if not self.armed or i is None:
            return
        if i < len(self.in_flight):
            raise RuntimeError(
                "OverlappedGradSync: a gradient was accumulated again after its bucket was reduced (a parameter "
                "used by two separate backward passes); set engine.overlap_grad_sync=false"
            )
        self.waiting[i] -= 1
        while len(self.in_flight) < len(self.buckets) and self.waiting[len(self.in_flight)] == 0:
            self._launch(len(self.in_flight))
            self.launched_in_backward += 1

    @torch.no_grad()
    def _launch(self, i: int) -> None:
        grads = []
        for p in self.buckets[i]:
            if p.grad is None:  # every rank must contribute the same buffers, used or not
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        self.in_flight.append((flat, dist.all_reduce(flat, group=self.bucket_groups[i], async_op=True)))

    def launch_remaining(self) -> None:
        """Sends the buckets backward did not (call right after the armed backward)."""
        self.armed = False
        while len(self.in_flight) < len(self.buckets):
            self._launch(len(self.in_flight))

    @torch.no_grad()
    def finish(self) -> None:
        """Waits for every bucket, writes the sums back, divides by W."""
        self.launch_remaining()
        world = self.mesh.world_size
        for bucket, (flat, work) in zip(self.buckets, self.in_flight):
            start = time.perf_counter()
            work.wait()
            self.wait_s += time.perf_counter() - start
            for p, synced in zip(bucket, flat.split([p.numel() for p in bucket])):
                torch.div(synced.view_as(p), world, out=p.grad)  # written back and divided in one pass
        unreduced = []  # no collective for them (see __init__), still the same semantics
        for p in self.params:
            if id(p) not in self.bucket_of:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                unreduced.append(p.grad)
        if unreduced:
            torch._foreach_div_(unreduced, world)
        self.in_flight = []


def _numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _sum_of_squares(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads)).float().square().sum()


@torch.no_grad()
def global_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """Exact L2 norm of the full (unsharded) gradient, identical on all ranks; call after sync_gradients.

    Dense gradients are the same on every rank and count once. Each expert shard counts once: its squares
    are summed over the EP group only (EDP replicas are identical and would be counted edp times over the
    world; averaging per-rank norms, a known bug elsewhere, is wrong for any ep > 1).
    """
    dense, expert = split_parameters(model)
    device = next(model.parameters()).device
    expert_sq = _sum_of_squares(expert, device)
    if mesh.ep_group is not None:
        dist.all_reduce(expert_sq, group=mesh.ep_group)
    return (_sum_of_squares(dense, device) + expert_sq).sqrt()


@torch.no_grad()
def clip_gradients_(model: nn.Module, *, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scales all gradients by min(1, max_norm / total_norm); the same factor on every rank."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))
