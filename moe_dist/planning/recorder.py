"""What one planned training step does on its (fake) device, op by op: memory, kernels, collectives, syncs.

``StepRecorder`` is one TorchDispatchMode that sees every aten op of the step under FakeTensorMode and keeps
- memory: every device storage by weakref (rounded up to the CUDA caching allocator's 512-byte blocks), charged
  to a category (parameters, gradients, optimizer state, activations, temporaries) and its peak; O(1) per op
  (torch's MemTracker gives the same numbers but walks every module per op: ~10x slower at 8x7B shapes);
- kernels: FLOPs (torch.utils.flop_counter's formulas, plus ``_grouped_mm``) and bytes read and written, in
  issue order, for the roofline (planning/roofline.py);
- collectives: kind, group, bytes sent to and received from each peer rank, and whether they run beside the
  compute stream (issued on a side stream, as FSDP2 does, or ``async_op``);
- host syncs: reads of device values (``.item()``, ``.tolist()``, device→host copies), blocking host→device
  copies (``cudaMemcpy`` from pageable memory waits for the stream), ops whose output size depends on data.
  Fake tensors have no values: scalar reads are answered (1, 1.0, True) so host code runs on; the dispatcher's
  routing counts come from its seam instead (planning/routing.py), which reports its syncs here.

``fused_sdpa``: on a CPU-only build ``F.scaled_dot_product_attention`` of fake cuda tensors takes the math path
(materialised [B, H, S, S] scores); a GPU runs the fused flash / memory-efficient kernels, so this routes the
call to them, as the CUDA backend selection would.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this (CPU: exact sizes)

# Ops that allocate without a kernel, and ops that are only host bookkeeping.
NO_KERNEL = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.lift_fresh.default,
    aten._unsafe_view.default,
    aten.detach.default,
    aten.alias.default,
    aten.record_stream.default,
    aten.set_.source_Storage_storage_offset,
    aten.set_.source_Storage,
    aten.set_.source_Tensor,
    aten.resize_.default,
}
# Gathers read the rows they pick, not their whole source.
GATHERS = {aten.embedding.default, aten.index_select.default, aten.gather.default, aten.index.Tensor}
# Ops whose output size depends on data: a GPU must sync to learn it.
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
# What a new storage is charged to, by the trainer's step phase it appears in.
PHASE_CATEGORY = {"forward": "activations", "backward": "backward_temp"}
COLLECTIVES = {
    **dict.fromkeys(["alltoall_base_", "alltoall_", "all_to_all_single"], "all_to_all"),
    **dict.fromkeys(["allreduce_", "allreduce_coalesced_", "all_reduce", "all_reduce_", "all_reduce_coalesced",
                     "all_reduce_coalesced_"], "all_reduce"),
    **dict.fromkeys(["_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_",
                     "all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced"],
                    "all_gather"),
    **dict.fromkeys(["_reduce_scatter_base_", "reduce_scatter_", "reduce_scatter_tensor_coalesced_",
                     "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"], "reduce_scatter"),
    **dict.fromkeys(["broadcast_", "broadcast"], "broadcast"),
}  # fmt: skip
ATTENTION = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
}


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._grouped_mm``: every row meets exactly one group's matrix, so the count does not depend on offs.
    2D x 3D (experts forward, input gradient) and 2D x 2D with offs (weight gradient: groups split the
    contraction): 2·M·K·N; 3D x 3D (batched): 2·G·M·K·N; 3D x 2D (offs split N): 2·M·K·N_total."""
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * math.prod(a_shape) * b_shape[-1]


def _grouped_mm_counter(a, b, *args, out_val=None, **kwargs) -> int:
    return grouped_mm_flops(tuple(a.shape), tuple(b.shape))


FLOPS = {packet: fn for packet, fn in flop_registry.items()}
FLOPS[aten._grouped_mm] = _grouped_mm_counter


def _is_causal(func, args, kwargs) -> bool:
    names = [a.name for a in func._schema.arguments]
    i = names.index("is_causal")
    return bool(kwargs.get("is_causal", args[i] if i < len(args) else False))


def _non_blocking(func, args, kwargs) -> bool:
    if func is aten.copy_.default:
        return bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
    return bool(kwargs.get("non_blocking", False))


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Kernel:
    phase: str
    op: str
    flops: int  # as torch's flop counter counts them (attention: the full S x S square)
    work_flops: int  # what the kernel computes (causal attention skips the upper triangle: half)
    bytes: int  # read + written
    dtype: torch.dtype  # of the matmul inputs (picks the peak FLOP/s), or of the first input
    reads: tuple[int, ...]  # serials of the storages read (waits for side-stream collectives producing them)


@dataclass
class Collective:
    phase: str
    kind: str  # all_to_all, all_reduce, all_gather, reduce_scatter, broadcast
    group: tuple[int, ...]  # global ranks
    send_to: dict[int, int]  # peer rank -> bytes this rank sends to it (all_to_all); else {}
    recv_from: dict[int, int]
    nbytes: int  # the collective's size: all_reduce: the tensor; all_gather: output; reduce_scatter: input
    side: bool  # runs beside the compute stream (side stream or async_op): overlaps with compute
    reads: tuple[int, ...]
    writes: tuple[int, ...]


@dataclass
class Sync:
    phase: str
    what: str  # e.g. "item", "tolist", "d2h_copy", "h2d_blocking_copy", "routing_counts"


@dataclass
class MemoryStats:
    peak: int = 0
    peak_phase: str = ""
    at_peak: dict[str, int] = field(default_factory=dict)
    phase_peak: dict[str, int] = field(default_factory=dict)  # the most bytes live during each step phase
    category_peak: dict[str, int] = field(default_factory=dict)  # the most bytes of each category at once
    live: dict[str, int] = field(default_factory=dict)


class StepRecorder(TorchDispatchMode):
    """Enter inside FakeTensorMode (after it), around the step. ``phase`` names the current step phase
    (set by the trainer's phase hook); ``track`` registers storages that exist before entering."""

    def __init__(self, *, device_type: str = "cuda", rank: int, streams=None, answer_scalars: bool = True):
        super().__init__()
        self.device_type, self.rank, self.streams = device_type, rank, streams
        self.block = CUDA_BLOCK if device_type == "cuda" else 1
        self.answer_scalars = answer_scalars
        self.phase = "setup"
        self.events: list[Kernel | Collective | Sync] = []
        self.syncs: dict[str, int] = defaultdict(int)
        self.sync_label: str | None = None  # set by labelled()
        # memory
        self.live: dict[str, int] = defaultdict(int)
        self.total = 0
        self.mem = MemoryStats()
        self._storages: dict[int, list] = {}  # id(storage) -> [weakref, category, bytes, serial]
        self._serial = 0
        self._in_tolist = False
        self._orig_tolist = None
        self._orig_resize = None

    # ---- memory -------------------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device_type

    def _bump(self, category: str, delta: int) -> None:
        self.live[category] += delta
        self.total += delta
        if delta > 0:
            if self.live[category] > self.mem.category_peak.get(category, 0):
                self.mem.category_peak[category] = self.live[category]
            if self.total > self.mem.phase_peak.get(self.phase, 0):
                self.mem.phase_peak[self.phase] = self.total
            if self.total > self.mem.peak:
                self.mem.peak, self.mem.peak_phase = self.total, self.phase
                self.mem.at_peak = {k: v for k, v in self.live.items() if v}

    def _entry(self, t: torch.Tensor, category: str | None = None) -> list | None:
        """The bookkeeping entry of ``t``'s storage, created (and charged) on first sight."""
        if not isinstance(t, torch.Tensor) or not self._on_device(t):
            return None
        t = getattr(t, "_local_tensor", t)  # a DTensor's memory is its local shard
        storage = t.untyped_storage()
        key = id(storage)
        entry = self._storages.get(key)
        if entry is not None:
            return entry
        category = category or PHASE_CATEGORY.get(self.phase, "temp")
        self._serial += 1
        entry = [None, category, -(-storage.nbytes() // self.block) * self.block, self._serial]

        def freed(_, key=key, entry=entry):
            if self._storages.get(key) is entry:
                del self._storages[key]
                self._bump(entry[1], -entry[2])

        entry[0] = weakref.ref(storage, freed)
        self._storages[key] = entry
        self._bump(category, entry[2])
        return entry

    def track(self, category: str, tensors) -> None:
        """Charges storages that exist already (parameters, buffers, optimizer state) to ``category``."""
        for t in tensors:
            if t is not None:
                self._entry(t, category)

    def recategorize(self, category: str, tensors) -> None:
        """Moves storages to ``category`` (gradients after backward, optimizer state after the step)."""
        for t in tensors:
            entry = self._entry(t, category) if t is not None else None
            if entry is not None and entry[1] != category:
                self._bump(entry[1], -entry[2])
                entry[1] = category
                self._bump(category, entry[2])

    def memory(self) -> MemoryStats:
        self.mem.live = {k: v for k, v in self.live.items() if v}
        return self.mem

    # ---- syncs --------------------------------------------------------------------------------------
    def _host_resident(self, t: torch.Tensor) -> bool:
        """AdamW's step counters: on the host in a GPU job too (non-capturable AdamW), so reading them does not
        sync; only a CPU plan sees them on its device."""
        entry = self._storages.get(id(t.untyped_storage()))
        return entry is not None and entry[1] == "optimizer_state" and t.numel() == 1

    def host_sync(self, what: str) -> None:
        if self.phase == "data":  # host work on the host-resident token stream: no device involved
            return
        what = self.sync_label or what
        self.syncs[what] += 1
        self.events.append(Sync(self.phase, what))

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        """Host syncs inside are recorded as ``label`` (the routing counts' read: "routing_counts")."""
        self.sync_label = label
        try:
            yield
        finally:
            self.sync_label = None

    def __enter__(self):
        from torch._subclasses.fake_tensor import FakeTensor

        recorder = self
        self._orig_tolist = FakeTensor.tolist
        self._orig_resize = torch.UntypedStorage.resize_

        def tolist(t):  # a fake tensor's tolist is one .item() per element: one D2H copy on a GPU
            if recorder._in_tolist or not recorder._on_device(t):
                return recorder._orig_tolist(t)
            recorder.host_sync("tolist")
            recorder._in_tolist = True
            try:
                return recorder._orig_tolist(t)
            finally:
                recorder._in_tolist = False

        def resize_(storage, size):  # FSDP2 frees and re-allocates unsharded parameters this way
            entry = recorder._storages.get(id(storage))
            out = recorder._orig_resize(storage, size)
            if entry is not None:
                new = -(-storage.nbytes() // self.block) * self.block
                recorder._bump(entry[1], new - entry[2])
                entry[2] = new
            return out

        FakeTensor.tolist = tolist
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        from torch._subclasses.fake_tensor import FakeTensor

        FakeTensor.tolist = self._orig_tolist
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)

    # ---- dispatch -----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            if self._on_device(args[0]) and not self._in_tolist and not self._host_resident(args[0]):
                self.host_sync("item")
            if self.answer_scalars:
                dtype = args[0].dtype
                return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
            return func(*args, **kwargs)
        if func in DATA_DEPENDENT and not (
            func is aten.repeat_interleave.Tensor and kwargs.get("output_size")
        ):
            if any(self._on_device(t) for t in _tensors(args)):
                self.host_sync(f"data_dependent_shape:{func.overloadpacket.__name__}")
            return func(*args, **kwargs)
        if func is aten._pin_memory.default:  # no fake kernel: pinning changes where, not what
            return args[0]
        if func is aten.is_pinned.default:
            return True
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst_device = (
                torch.device(kwargs.get("device") or src.device)
                if func is aten._to_copy.default
                else args[0].device
            )
            if isinstance(src, torch.Tensor) and src.device.type != dst_device.type:
                if src.device.type == self.device_type:
                    self.host_sync("d2h_copy")
                elif dst_device.type == self.device_type and not _non_blocking(func, args, kwargs):
                    # cudaMemcpy from pageable host memory: copy_kernel_cuda calls memcpy_and_sync
                    self.host_sync("h2d_blocking_copy")
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            self._collective(func, args, kwargs, out)
            return out
        self._kernel(func, args, kwargs, out)
        return out

    def _reads(self, tensors) -> tuple[int, ...]:
        serials = []
        for t in tensors:
            if self._on_device(t):
                entry = self._storages.get(id(getattr(t, "_local_tensor", t).untyped_storage()))
                if entry is not None:
                    serials.append(entry[3])
        return tuple(serials)

    def _kernel(self, func, args, kwargs, out) -> None:
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        device_outputs = [t for t in outputs if self._on_device(t)]
        if not any(self._on_device(t) for t in inputs) and not device_outputs:
            return
        reads = self._reads(inputs)  # before the outputs are registered (in-place outputs are inputs too)
        for t in device_outputs:
            self._entry(t)
        returns = func._schema.returns
        is_view = bool(returns) and all(
            r.alias_info is not None and not r.alias_info.is_write for r in returns
        )
        writes_nothing = not outputs and not func._schema.is_mutable  # queries (prim.device, sizes)
        if is_view or writes_nothing or func in NO_KERNEL:
            return
        if func in GATHERS:
            index_bytes = sum(_nbytes(t) for t in inputs[1:] if not t.is_floating_point())
            nbytes = 2 * sum(_nbytes(t) for t in device_outputs) + index_bytes
        else:
            nbytes = sum(_nbytes(t) for t in inputs if self._on_device(t))
            written = [t for t in device_outputs if not any(t is i for i in inputs)]
            nbytes += sum(_nbytes(t) for t in written)
        counter = FLOPS.get(func.overloadpacket)
        flops = int(counter(*args, **kwargs, out_val=out)) if counter is not None else 0
        work = flops // 2 if func in ATTENTION and _is_causal(func, args, kwargs) else flops
        first = next((t for t in inputs if t.is_floating_point()), inputs[0] if inputs else None)
        dtype = first.dtype if first is not None else torch.float32
        self.events.append(
            Kernel(self.phase, func.overloadpacket.__name__, flops, work, nbytes, dtype, reads)
        )

    def _collective(self, func, args, kwargs, out) -> None:
        kind = COLLECTIVES.get(func.overloadpacket.__name__)
        if kind is None:  # wait_tensor, barrier, ...: no data
            return
        from torch.distributed._tools.fake_collectives import CollectiveOp

        ranks = tuple(dist.get_process_group_ranks(CollectiveOp.get_process_group(func, args)))
        c10d = func.namespace == "c10d"
        # c10d ops take (output(s), input(s), ...) except the in-place all_reduce / broadcast; functional
        # collectives take the input and return the output.
        if kind in ("all_reduce", "broadcast"):
            sized, inputs, written = args[0], args[0], args[0] if c10d else out
        elif kind == "all_gather":  # sized by the gathered output
            sized, inputs, written = (args[0], args[1], args[0]) if c10d else (out, args[0], out)
        else:  # reduce_scatter, all_to_all: sized by the full input
            sized, inputs, written = (args[1], args[1], args[0]) if c10d else (args[0], args[0], out)
        send_to: dict[int, int] = {}
        recv_from: dict[int, int] = {}
        if func is torch.ops.c10d.alltoall_base_.default:
            output, inp, _, out_splits, in_splits = args[:5]
            send_to = _per_peer(inp, in_splits, ranks)
            recv_from = _per_peer(output, out_splits, ranks)
        # c10d ops leave out an async_op equal to the schema's default (True): async_op=True calls pass nothing.
        schema_args = {a.name: (i, a) for i, a in enumerate(func._schema.arguments)}
        async_op = False
        if "async_op" in schema_args:
            i, arg = schema_args["async_op"]
            default = arg.default_value if arg.has_default_value() else False
            async_op = bool(args[i] if i < len(args) else kwargs.get("async_op", default))
        side = async_op or not c10d or bool(self.streams and self.streams.on_side_stream)
        self.events.append(
            Collective(
                phase=self.phase,
                kind=kind,
                group=ranks,
                send_to=send_to,
                recv_from=recv_from,
                nbytes=sum(_nbytes(t) for t in _tensors(sized)),
                side=side,
                reads=self._reads(_tensors(inputs)),
                writes=self._reads(_tensors(written)),
            )
        )


def _per_peer(t: torch.Tensor, splits, ranks) -> dict[int, int]:
    """Bytes per peer rank of an all_to_all_single buffer cut into ``splits`` rows (even when none given)."""
    row = _nbytes(t) // max(1, t.shape[0]) if t.dim() else _nbytes(t)
    if not splits:
        splits = [t.shape[0] // len(ranks)] * len(ranks)
    return {r: int(n) * row for r, n in zip(ranks, splits) if n}


@contextlib.contextmanager
def fused_sdpa():
    """Routes ``F.scaled_dot_product_attention`` on cuda to the fused kernel a GPU would run: flash attention
    (bf16 / fp16, no mask), else memory-efficient attention; grouped-query attention with the key/value
    heads expanded as views. Patched on the function itself (not a TorchFunctionMode, which activation
    checkpointing's recompute in backward does not see)."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "cuda":
            return original(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
        q, k, v = query, key, value
        if torch.is_autocast_enabled("cuda"):  # F.sdpa is on autocast's list, the aten kernels are not
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if k.shape[-3] != q.shape[-3]:  # GQA: each key/value head serves q_heads / kv_heads query heads
            group = q.shape[-3] // k.shape[-3]
            k = k.unsqueeze(-3).expand(*k.shape[:-2], group, *k.shape[-2:]).flatten(-4, -3)
            v = v.unsqueeze(-3).expand(*v.shape[:-2], group, *v.shape[-2:]).flatten(-4, -3)
        if attn_mask is None and q.dtype in (torch.bfloat16, torch.float16):
            return aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=scale
            )[0]
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
