"""Turns a built single-device model into an EP x DP model, and the gradient semantics that go with it.

Loss convention: every rank computes its loss so that the mean over the W ranks is the global-mean loss
(equal local batches: the local mean). Then:
- dense parameters (replicated on all ranks): all-reduce sum over the world, divide by W;
- expert parameters (one shard per EP rank, replicated over EDP): the backward all-to-all has already
  summed the contributions of every rank in the EP group, so all-reduce sum over EDP covers all W ranks,
  and the divisor is W as well (not edp: averaging over EDP alone would leave them ep times too large).
Each gradient then equals the single-device gradient of the global-mean loss.

With ``engine=fsdp`` (``parallelize_fsdp``) the same semantics hold with sharded parameters: FSDP2's
reduce-scatter averages dense gradients over the world and expert gradients over EDP, and the engine divides
the expert gradients by ep once more (``scale_expert_grads_``), which makes them sum / W as well.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe_dist.config import parse_activation_checkpointing
from moe_dist.moe.dispatch import TokenDispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.mesh import Mesh
from moe_dist.precision import accum_dtype

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


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Recompute in backward instead of keeping activations (``trainer.activation_checkpointing``), in place.

    ``full`` / ``every_n:<n>``: the whole block (every n-th), its exchanges included; ``moe``: the grouped
    expert compute only, between the two all-to-alls: the routing decisions and the exchanged rows are kept,
    so recompute neither repeats an all-to-all nor can change a top-k choice. torch's composable
    ``checkpoint`` puts the recompute on forward hooks: parameter names (checkpoints) stay as they are and
    FSDP2 can shard the same modules afterwards.
    """
    kind, every = parse_activation_checkpointing(mode)
    if kind == "moe":
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                checkpoint(layer.experts)
    elif kind == "every_n":
        for i, block in enumerate(model.layers):
            if i % every == 0:
                # early_stop=False: the recompute always runs the whole block, so every rank issues the
                # block's collectives in backward whatever tensors it happened to save.
                checkpoint(block, early_stop=False)
    return model


def parallelize_fsdp(
    model: nn.Module, mesh: Mesh, *, bf16: bool, reshard_after_forward: bool, prefetch: int = 0
) -> nn.Module:
    """Shards the parameters with FSDP2 (in place; after ``parallelize_moe`` and activation checkpointing,
    on the meta device or on real tensors): dense parameters over all W ranks, one unit per block, one for
    the token embeddings (untied) and the root (final norm, LM head); expert parameters over their EDP group.

    Experts first become DTensors of the global [E, ...] tensor on the ``ep`` sub-mesh (Shard(0): this EP
    rank's L experts), then FSDP shards them over ``edp``: a 2-D (edp, ep) DTensor whose files in a checkpoint
    hold the global layout. FSDP splits dim 0 (the L local experts) when edp divides L, else dim 1 (the model
    dim), so that no rank gets an empty shard. ``bf16``: parameters are gathered in bf16 and gradients
    reduced in fp32 (``MixedPrecisionPolicy``); each router is a unit of its own kept in fp32. ``prefetch``:
    each unit issues the all-gathers of the next ``prefetch`` units (forward) and of the previous ones
    (backward) itself, before its own compute, instead of when the CPU reaches them.
    Needs a process group, also at world 1 (``mesh.device_mesh`` is not None).
    """
    assert mesh.device_mesh is not None, "engine=fsdp needs a process group, also at world 1"
    dp_mesh = mesh.device_mesh._flatten("dp")  # all W ranks, the same order as the (edp, ep) mesh
    edp_mesh, ep_mesh = mesh.device_mesh["edp"], mesh.device_mesh["ep"]
    # cast_forward_inputs=False: the rope tables a block receives stay fp32 (inputs are bf16 already).
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        cast_forward_inputs=False,
    )
    options = {"mp_policy": policy, "reshard_after_forward": reshard_after_forward}
    for block in model.layers:
        if isinstance(block.ffn, MoELayer):
            experts: GroupedExperts = block.ffn.experts
            split_dim = 0 if experts.num_local_experts % mesh.edp == 0 else 1
            if mesh.ep > 1:
                for name in ("w_gate_up", "w_down"):
                    shard = getattr(experts, name)
                    global_view = DTensor.from_local(shard.detach(), ep_mesh, [Shard(0)], run_check=False)
                    setattr(experts, name, nn.Parameter(global_view, requires_grad=shard.requires_grad))
            fully_shard(experts, mesh=edp_mesh, shard_placement_fn=lambda p, d=split_dim: Shard(d), **options)
            if bf16:
                router_policy = MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=False)
                fully_shard(block.ffn.router, mesh=dp_mesh, mp_policy=router_policy)
        fully_shard(block, mesh=dp_mesh, **options)
    if model.output is not None:
        fully_shard(model.tok_embeddings, mesh=dp_mesh, **options)
    # The root unit holds the final norm and the LM head weight (the token embeddings when they are tied: a
    # tied weight must live in one unit). The loss uses the head weight outside any module's forward
    # (model/loss.py), which FSDP2 would not gather for; the root's parameters are gathered before the
    # first block and, without resharding after forward, stay gathered until the end of backward.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    if prefetch:
        units = [*([model.tok_embeddings] if model.output is not None else []), *model.layers]
        for i, unit in enumerate(units):
            unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + prefetch])
            unit.set_modules_to_backward_prefetch(units[max(0, i - prefetch) : i][::-1])
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


def _sum_of_squares(params: list[nn.Parameter], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device, dtype=dtype)
    return torch.stack(torch._foreach_norm(grads)).to(dtype).square().sum()


@torch.no_grad()
def global_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """Exact L2 norm of the full (unsharded) gradient, identical on all ranks; call after sync_gradients.

    Dense gradients are the same on every rank and count once. Each expert shard counts once: its squares
    are summed over the EP group only (EDP replicas are identical and would be counted edp times over the
    world; averaging per-rank norms, a known bug elsewhere, is wrong for any ep > 1).
    """
    dense, expert = split_parameters(model)
    first = next(model.parameters())
    dtype = accum_dtype(first)  # fp32; fp64 in fp64 mode
    expert_sq = _sum_of_squares(expert, first.device, dtype)
    if mesh.ep_group is not None:
        dist.all_reduce(expert_sq, group=mesh.ep_group)
    return (_sum_of_squares(dense, first.device, dtype) + expert_sq).sqrt()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor as it is)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def scale_expert_grads_(model: nn.Module, factor: float) -> None:
    """Multiplies every expert gradient (this rank's shard) by ``factor``."""
    _, expert = split_parameters(model)
    grads = [local_tensor(p.grad) for p in expert if p.grad is not None]
    if grads and factor != 1:
        torch._foreach_mul_(grads, factor)


@torch.no_grad()
def sharded_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """Exact L2 norm of the full gradient when every parameter is sharded (engine=fsdp), identical on all
    ranks: each element of each gradient lives on exactly one rank (dense: one of W; experts: one of the
    edp x ep grid), so one world sum of the local squares counts everything once. torch's
    ``clip_grad_norm_`` cannot do this here: it stacks norms of DTensors on two different meshes."""
    params = list(model.parameters())
    dtype = accum_dtype(params[0])
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    grads = [g for g in grads if g.numel()]  # an uneven Shard(0) can leave a rank an empty shard
    total = torch.zeros((), dtype=dtype, device=local_tensor(params[0]).device)
    if grads:
        total = torch.stack(torch._foreach_norm(grads)).to(dtype).square().sum()
    if mesh.world_group is not None:
        dist.all_reduce(total, group=mesh.world_group)
    return total.sqrt()


@torch.no_grad()
def clip_gradients_(model: nn.Module, *, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scales all gradients by min(1, max_norm / total_norm); the same factor on every rank."""
    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))
