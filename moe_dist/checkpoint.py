"""Reshardable, atomic, verified checkpoints with torch.distributed.checkpoint (DCP), written synchronously or
in the background.

Layout: ``<out_dir>/checkpoints/step_<N>/`` holds DCP's files, its ``.metadata`` and our ``meta.json``. The
files hold one *global* layout: ``model.<name>`` (fp32 master weights and buffers) and
``optim.<param>.<slot>``, each tensor in its full shape. Every rank writes only the pieces it holds (whole
tensors, DTensor shards, ZeRO fragments: ``moe_dist.parallel.layout``) into its own files; nothing is
gathered on any rank, and any (world, ep, engine) reads back the pieces it needs (DCP resharding).

Saving (``Checkpointer.save``): into ``.tmp_step_<N>``. Each rank hashes the bytes of its files as it writes
them (sha256), in parallel with the others; the digests are gathered into ``meta.json`` and the directory is
renamed to ``step_<N>`` only once every rank's write has completed. A crash at any point leaves the newest
complete checkpoint as it was; directories without the rename are ignored. Asynchronous saves copy the state
to host memory (the only stall), then write, hash, gather and rename in the background on a process group
of their own (gloo), while training goes on.

Resuming (``select_checkpoint``): each rank re-hashes a share of the files (largest first, balanced by
bytes) and the verdicts are gathered, so verification is as parallel as the write. Loading never unpickles
arbitrary objects (``_MetadataUnpickler``); tensors load with ``weights_only=True``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from moe_dist.distributed import all_gather_json, broadcast_json
from moe_dist.moe.experts import GroupedExperts
from moe_dist.parallel.layout import GlobalTensor, expert_dtensor, pieces_of
from moe_dist.parallel.mesh import Mesh

# A process without a process group saves and loads alone on purpose (a world of 1); DCP warns at every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_BLOCK = 1 << 22
# Model fields that change the parameter shapes: a checkpoint must agree on all of them.
STRUCTURAL_KEYS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "ffn_hidden",
    "moe.num_experts",
    "moe.expert_hidden",
    "moe.num_shared_experts",
    "moe.every_n_layers",
    "moe.noisy_gate",
)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its index with pickle; only DCP's own metadata classes and torch scalars may appear."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    _ALLOWED = frozenset(
        {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch.serialization", "_get_layout"),
            ("torch", "Size"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str):
        if module in self._ALLOWED_MODULES or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with the restricted unpickler; the index is read once per reader (loads in several parts
    reuse it)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        cached = getattr(self, "_moe_dist_metadata", None)
        if cached is None:
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                cached = self._moe_dist_metadata = _MetadataUnpickler(f).load()
        if getattr(cached, "storage_meta", None) is None:
            cached.storage_meta = StorageMeta()
        cached.storage_meta.load_id = self.load_id
        return cached


# ----------------------------------------------------------------------------------------- directories


def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS


def complete_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(out_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / META_FILE).is_file() and (child / ".metadata").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def validate_resume(resume: str) -> None:
    """``trainer.resume`` names "auto", "none" or a complete checkpoint directory; checked before any collective."""
    if resume not in ("auto", "none") and not (Path(resume) / META_FILE).is_file():
        raise ValueError(
            f"trainer.resume={resume!r}: must be auto, none, or a complete checkpoint directory "
            "(.../checkpoints/step_<N>)"
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (``.../checkpoints/step_N``), or a run directory: its newest checkpoint."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    newest = latest_checkpoint(path) if path.is_dir() else None
    if newest is None:
        raise ValueError(
            f"checkpoint={str(path)!r}: neither a checkpoint (no {META_FILE}) nor a run directory"
        )
    return newest


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"trainer.resume={str(path)!r}: not a complete checkpoint (no {META_FILE})")
    with open(meta_path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ integrity


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class _DigestingFile:
    """A file being written whose bytes are hashed on their way to disk (DCP writes each file front to back;
    a seek would make the running digest meaningless, so the file is then hashed again once closed)."""

    def __init__(self, raw: Any):
        self._raw, self.sha, self.bytes, self.sequential = raw, hashlib.sha256(), 0, True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.bytes += memoryview(data).nbytes
        return self._raw.write(data)

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return self._raw.seek(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _DigestingFileSystem(FileSystem):
    """DCP's local file system, recording the sha256 and size of every file this rank writes."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, tuple[str, int]] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            wrapped = _DigestingFile(stream)
            yield wrapped
        path = Path(path)
        if wrapped.sequential:
            self.digests[path.name] = (wrapped.sha.hexdigest(), wrapped.bytes)
        else:
            self.digests[path.name] = _sha256_file(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        if Path(path).name in self.digests:  # DCP writes .metadata under a temporary name first
            self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class _Writer(FileSystemWriter):
    """DCP's file writer, one file per rank, hashing what it writes and holding one piece at a time."""

    def __init__(self, path: Path):
        super().__init__(path, single_file_per_rank=True, sync_files=True)
        self.fs = _DigestingFileSystem()

    def stage(self, state_dict: dict) -> dict:
        return state_dict  # Checkpointer._stage copied it already, into buffers reused from save to save

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Writes this rank's pieces into its file in DCP's format (each a ``torch.save`` record at a recorded
        offset), each copied to host memory right before and dropped right after. DCP's own loop keeps every
        tensor of a file alive until the file is closed: a copy of the rank's whole share (ZeRO fragments are
        views of flat partitions, so they are copied too)."""
        name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    torch.save(_own_storage(data.detach().cpu()), stream)
                length = stream.tell() - offset
                results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
                del data
            stream.flush()
            os.fsync(stream.fileno())
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view of a larger storage (``torch.save`` writes a tensor's whole storage)."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _share(files: dict[str, int], world: int, rank: int) -> list[str]:
    """This rank's share of ``files`` (name → bytes) to verify: largest first, each to the least loaded rank."""
    loads = [0] * world
    mine = []
    for name in sorted(files, key=lambda n: (-files[n], n)):
        owner = min(range(world), key=lambda r: (loads[r], r))
        loads[owner] += files[name]
        if owner == rank:
            mine.append(name)
    return mine


def _verify_files(path: Path, recorded: dict[str, list], names: list[str]) -> list[str]:
    problems = []
    for name in names:
        digest, size = recorded[name]
        file = path / name
        if not file.is_file():
            problems.append(f"file {name} is missing")
            continue
        if size is not None and file.stat().st_size != size:
            problems.append(f"file {name} has {file.stat().st_size} bytes, {size} were written (truncated)")
            continue
        if _sha256_file(file)[0] != digest:
            problems.append(f"file {name} does not match its sha256 digest (corrupted)")
    return problems


def verify(path: str | os.PathLike, *, group: dist.ProcessGroup | None = None) -> str | None:
    """None when every file matches the digest recorded at save time, else what is wrong (the same answer on
    every rank). Collective over ``group`` when one is given: each rank hashes its share of the files."""
    path = Path(path)
    recorded: dict[str, Any] = {}
    if group is None or dist.get_rank(group) == 0:
        try:
            meta = read_meta(path)
            files = meta.get("sha256")
            if files is None:
                recorded = {"error": f"{META_FILE} has no file digests"}
            else:
                sizes = meta.get("file_bytes", {})
                recorded = {"files": {n: [d, sizes.get(n)] for n, d in files.items()}}
        except (ValueError, json.JSONDecodeError) as err:
            recorded = {"error": f"unreadable {META_FILE}: {err}"}
    if group is not None:
        recorded = broadcast_json(recorded, group=group)
    if "error" in recorded:
        return recorded["error"]
    files = recorded["files"]
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    bytes_of = {n: size if size is not None else _size_or_zero(path / n) for n, (_, size) in files.items()}
    problems = _verify_files(path, files, _share(bytes_of, world, rank))
    if group is not None:
        problems = [p for share in all_gather_json(problems, group=group) for p in share]
    return min(problems) if problems else None


def _size_or_zero(file: Path) -> int:
    return file.stat().st_size if file.is_file() else 0


def select_checkpoint(
    resume: str, out_dir: str | os.PathLike, *, group: dist.ProcessGroup | None = None
) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from, verified against its digests, and warnings about skipped ones.

    ``auto``: the newest complete checkpoint in out_dir whose files are intact; a corrupted newer one is
    skipped with a warning rather than loaded. An explicit path that fails verification is an error.
    Collective over ``group`` when one is given (the first rank lists, every rank verifies a share).
    """
    if resume == "none":
        return None, []
    if resume != "auto":
        problem = verify(resume, group=group)
        if problem:
            raise ValueError(f"trainer.resume={resume!r}: {problem}")
        return str(resume), []
    candidates = [(step, str(path)) for step, path in reversed(complete_checkpoints(out_dir))]
    if group is not None:
        candidates = broadcast_json(candidates, group=group)
    warnings = []
    for step, path in candidates:
        problem = verify(path, group=group)
        if problem is None:
            return path, warnings
        warnings.append(f"warning: skipping checkpoint step {step} at {path}: {problem}")
    return None, warnings


# ---------------------------------------------------------------------------------- the global layout


def model_state(model: nn.Module, mesh: Mesh) -> dict[str, GlobalTensor]:
    """``model.<name>`` for every parameter and persistent buffer, aliasing the live tensors (so a load fills
    them in place); experts as DTensors over ep. Engines replace the parameters by their fp32 masters."""
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    return {
        f"model.{name}": expert_dtensor(t.detach(), mesh) if id(t) in experts else t.detach()
        for name, t in model.state_dict(keep_vars=True).items()
    }


@dataclass(frozen=True)
class _Piece:
    fqn: str
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]


def _pieces(state: dict[str, GlobalTensor]) -> tuple[dict[str, torch.Tensor], dict[str, _Piece]]:
    """What DCP is handed: one plain tensor per piece this rank holds, under keys of our own, and where each
    piece sits in its global tensor."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, _Piece] = {}
    for fqn, value in state.items():
        shape, parts = pieces_of(value)
        for i, (offsets, tensor) in enumerate(parts):
            key = f"{fqn}#{i}"
            tensors[key], where[key] = tensor.detach(), _Piece(fqn, tuple(offsets), shape)
    return tensors, where


class _SavePlanner(DefaultSavePlanner):
    """Writes every piece at its place in the global tensor; DCP's global planning (one copy of replicated
    pieces, balanced over the ranks; the check that the pieces tile each tensor) and metadata are kept."""

    def __init__(self, where: dict[str, _Piece]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.where = where
        self.key_of = {(p.fqn, p.offsets): key for key, p in where.items()}

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, tensor in self.state_dict.items():
            piece = self.where[key]
            whole = tuple(tensor.shape) == piece.global_shape
            items.append(
                WriteItem(
                    index=MetadataIndex(piece.fqn, torch.Size(piece.offsets)),
                    type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=tensor.size()),
                        properties=TensorProperties.create_from_tensor(tensor),
                        size=torch.Size(piece.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self.state_dict[self.key_of[(index.fqn, tuple(index.offset))]]


class _LoadPlanner(DefaultLoadPlanner):
    """Reads, for every piece this rank holds, the overlapping parts of the saved pieces (DCP resharding)."""

    def __init__(self, where: dict[str, _Piece]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.where = where
        self.key_of: dict[tuple[str, int], str] = {}

    def create_local_plan(self) -> LoadPlan:
        by_fqn: dict[str, list[str]] = {}
        for key in self.state_dict:
            by_fqn.setdefault(self.where[key].fqn, []).append(key)
        saved = self.metadata.state_dict_metadata
        items = []
        for fqn, keys in by_fqn.items():
            shape = self.where[keys[0]].global_shape
            if fqn not in saved:
                raise ValueError(f"the checkpoint has no tensor {fqn!r}")
            if tuple(saved[fqn].size) != shape:
                raise ValueError(
                    f"tensor {fqn!r}: shape {tuple(saved[fqn].size)} in the checkpoint, {shape} here"
                )
            chunks = []
            for i, key in enumerate(keys):
                self.key_of[(fqn, i)] = key
                chunks.append(
                    ChunkStorageMetadata(
                        offsets=torch.Size(self.where[key].offsets), sizes=self.state_dict[key].size()
                    )
                )
            items += create_read_items_for_chunk_list(fqn, saved[fqn], chunks)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[self.key_of[(index.fqn, index.index)]]


# ----------------------------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


@dataclass
class SaveReport:
    step: int
    path: Path  # the directory the checkpoint has (or will have, once an async save completes)
    stall_s: float  # time the caller was blocked (async: waiting for the previous save + staging)
    is_async: bool


@dataclass
class _InFlight:
    step: int
    started: float
    future: concurrent.futures.Future


def checkpoint_group(*, timeout_s: float | None = None) -> dist.ProcessGroup | None:
    """Collective (every rank, same point): a gloo group of all ranks for checkpoint traffic (None without a
    process group). Background saves run their collectives on it, never on the training group, so the two
    never interleave; DCP's background save needs a CPU backend anyway."""
    if not dist.is_initialized():
        return None
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    return dist.new_group(backend="gloo", timeout=timeout)


class Checkpointer:
    """Saves the checkpoints of one run, synchronously or in the background (one save in flight at most).

    Every rank creates one at the same point and calls ``save``, ``wait`` and ``close`` collectively.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        keep: int,
        is_async: bool,
        group: dist.ProcessGroup | None,
        on_task: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ):
        self.out_dir, self.keep, self.is_async, self.group = Path(out_dir), keep, is_async, group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.on_task = on_task or (lambda name: contextlib.nullcontext())
        self._staged: dict[str, torch.Tensor] = {}
        self._in_flight: _InFlight | None = None
        self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moe_dist-checkpoint")
        self.completed: list[dict] = []  # {"step", "write_s"} of background saves, as they complete

    def save(self, step: int, state: dict[str, GlobalTensor], *, meta: dict) -> SaveReport:
        """Collective. Writes ``state`` (``model_state`` | ``engine.checkpoint_state()``) as ``step_<step>``."""
        started = time.perf_counter()
        self.wait()
        root = checkpoints_root(self.out_dir)
        final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
            tmp.mkdir(parents=True)
        _barrier(self.group)
        tensors, where = _pieces(state)
        meta = {**meta, "step": step}
        writer, planner = _Writer(tmp), _SavePlanner(where)
        if not self.is_async:
            dcp.save(tensors, storage_writer=writer, planner=planner, process_group=self.group)
            self._finish(writer, tmp=tmp, final=final, meta=meta)
            return SaveReport(step, final, time.perf_counter() - started, is_async=False)
        staged = self._stage(tensors)
        written = dcp.async_save(staged, storage_writer=writer, planner=planner, process_group=self.group)

        def finish() -> float:
            with self.on_task(f"async checkpoint save of step {step} (DCP write, sha256, rename)"):
                written.result()
                self._finish(writer, tmp=tmp, final=final, meta=meta)
            return time.perf_counter()

        self._in_flight = _InFlight(step, time.perf_counter(), self._finisher.submit(finish))
        return SaveReport(step, final, time.perf_counter() - started, is_async=True)

    def _stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of every piece, into buffers kept from one save to the next (pinned for GPU tensors);
        the training may change the originals as soon as this returns."""
        staged = {}
        for key, t in tensors.items():
            buffer = self._staged.get(key)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self._staged[key] = buffer
            buffer.copy_(t, non_blocking=t.is_cuda)
            staged[key] = buffer
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.synchronize()  # host sync: the non-blocking copies must have landed
        return staged

    def _finish(self, writer: _Writer, *, tmp: Path, final: Path, meta: dict) -> None:
        """After every rank's DCP write: the digests each rank took of its own files go into meta.json (rank 0),
        then the rename that makes the checkpoint complete, then the retention."""
        mine = {name: [digest, size, self.rank] for name, (digest, size) in writer.fs.digests.items()}
        shares = all_gather_json(mine, group=self.group)
        digests = {name: entry for share in shares for name, entry in share.items()}
        if self.rank == 0:
            meta = {
                **meta,
                "world_size": len(shares),
                "sha256": {name: entry[0] for name, entry in sorted(digests.items())},
                "file_bytes": {name: entry[1] for name, entry in sorted(digests.items())},
                "file_rank": {name: entry[2] for name, entry in sorted(digests.items())},
            }
            with open(tmp / META_FILE, "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # re-saving a step (e.g. after a restart): replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            for _, old in complete_checkpoints(self.out_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.group)

    def wait(self) -> None:
        """Blocks until the background save (if any) is complete on every rank; re-raises its error."""
        if self._in_flight is None:
            return
        in_flight, self._in_flight = self._in_flight, None
        try:
            done = in_flight.future.result()
        except Exception as err:
            raise RuntimeError(
                f"the asynchronous checkpoint save of step {in_flight.step} failed: {err}"
            ) from err
        self.completed.append({"step": in_flight.step, "write_s": done - in_flight.started})

    def busy(self) -> bool:
        """Whether a background save is still being written on this rank."""
        return self._in_flight is not None and not self._in_flight.future.done()

    def poll(self) -> None:
        """Collects the background save if it has completed, without waiting (re-raises its error)."""
        if self._in_flight is not None and self._in_flight.future.done():
            self.wait()

    def close(self) -> None:
        self.wait()
        self._finisher.shutdown(wait=True)


def save_checkpoint(
    out_dir: str | os.PathLike,
    *,
    step: int,
    state: dict[str, GlobalTensor],
    meta: dict,
    keep: int,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Collective. One synchronous save (``Checkpointer`` for a run's sequence of saves)."""
    return Checkpointer(out_dir, keep=keep, is_async=False, group=group).save(step, state, meta=meta).path


# ----------------------------------------------------------------------------------------------- load


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(saved_model_cfg: dict, model_cfg: dict, *, path: str | os.PathLike) -> None:
    saved, current = _flatten(saved_model_cfg), _flatten(model_cfg)
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}"
        for k in STRUCTURAL_KEYS
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: " + "; ".join(diffs))


def read_into(
    reader: SafeFileSystemReader, state: dict[str, GlobalTensor], *, group: dist.ProcessGroup | None = None
) -> None:
    """Collective over ``group`` (or the default group; none in a single process without one). Fills every
    piece of ``state`` in place from the checkpoint, whatever layout it was saved in."""
    tensors, where = _pieces(state)
    dcp.load(tensors, storage_reader=reader, planner=_LoadPlanner(where), process_group=group)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    state: dict[str, GlobalTensor],
    model_cfg: dict,
    group: dist.ProcessGroup | None = None,
) -> dict:
    """Collective. Fills ``state`` (``model_state``, with an engine's ``checkpoint_state`` to resume training)
    in place from a checkpoint of any (world, ep) layout and any engine; returns meta."""
    meta = read_meta(path)
    check_compatible(meta["model"], model_cfg, path=path)
    read_into(SafeFileSystemReader(path), state, group=group)
    return meta


def saved_tensors(reader: SafeFileSystemReader) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in a checkpoint, from its index alone."""
    return {
        fqn: (tuple(md.size), md.properties.dtype)
        for fqn, md in reader.read_metadata().state_dict_metadata.items()
        if hasattr(md, "size")
    }


def read_tensors(reader: SafeFileSystemReader, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, whole and in their saved dtype, read by this process alone (no collective)."""
    saved = saved_tensors(reader)
    tensors = {name: torch.empty(saved[name][0], dtype=saved[name][1]) for name in names}
    pieces, where = _pieces(tensors)
    dcp.load(pieces, storage_reader=reader, planner=_LoadPlanner(where), no_dist=True)
    return tensors
