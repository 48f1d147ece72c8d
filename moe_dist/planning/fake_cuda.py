"""Fake CUDA devices on a CPU-only torch build: the shim that makes them work, and the torch.cuda patches.

``FakeTensorMode`` creates ``cuda`` tensors without a GPU, but on a CPU-only torch build anything that opens a
CUDA device guard (``Tensor.copy_``, ``.to("cuda")``, the autograd engine asking for the current stream of a
cuda gradient) fails with "PyTorch is not linked with support for cuda devices". ``fake_cuda_guard.cpp``
registers a do-nothing CUDA device guard and CUDA hooks whose ``isBuilt()`` is true; it is compiled once with
g++ against torch's own headers into a cache directory and loaded with ctypes.

It must be loaded **before the first ``import torch``**: torch's import looks the CUDA hooks up once. This
module therefore imports torch only inside functions; ``python -m moe_dist.plan`` calls ``load_shim()`` first.
Never load it into a training process: ``torch.cuda.is_available()`` stays False, but
``torch.accelerator.current_accelerator()`` becomes ``cuda``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("fake_cuda_guard.cpp")
_loaded: bool | None = None


class ShimError(RuntimeError):
    """The shim cannot be built or loaded here (no compiler, no torch headers, torch already imported)."""


def cache_dir() -> Path:
    base = os.environ.get("MOE_DIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe_dist"
    )
    return Path(base) / "fake_cuda"


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise ShimError("moe_dist.plan needs torch installed")
    return Path(spec.origin).parent


def torch_has_cuda() -> bool:
    """A CUDA build of torch (then fake cuda tensors need no shim)."""
    lib = _torch_dir() / "lib"
    return any(lib.glob("libtorch_cuda*")) or any(lib.glob("libc10_cuda*"))


def _build(torch_dir: Path) -> Path:
    """Compiles the shim once per (source, torch build); returns the shared library's path."""
    include, lib = torch_dir / "include", torch_dir / "lib"
    if not (include / "c10" / "core" / "impl" / "DeviceGuardImplInterface.h").is_file():
        raise ShimError(
            f"torch's C++ headers are missing under {include}: the planner compiles a small shim against them "
            "(a torch wheel from PyPI ships them)"
        )
    compiler = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")
    if compiler is None:
        raise ShimError(
            "no C++ compiler found (g++): the planner compiles a 70-line shim once to fake CUDA devices on this "
            "CPU-only torch build; install g++ (e.g. apt-get install g++) or set CXX"
        )
    key = hashlib.sha256(
        SHIM_SOURCE.read_bytes() + importlib.metadata.version("torch").encode() + str(torch_dir).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"libmoe_dist_fake_cuda-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [compiler, "-O1", "-std=c++20", "-shared", "-fPIC", "-w", f"-I{include}",
           f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", str(SHIM_SOURCE), f"-L{lib}", "-lc10",
           "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-o", tmp]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ShimError(f"compiling the fake-CUDA shim failed ({' '.join(cmd[:2])} ...): {last}")
    os.replace(tmp, target)  # atomic: concurrent planners may build the same file
    return target


def load_shim() -> bool:
    """Builds (once) and loads the shim; True when loaded, False on a CUDA build of torch (not needed).

    Must run before the first ``import torch`` in this process; raises ``ShimError`` otherwise.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if torch_has_cuda():
        _loaded = False
        return False
    if "torch" in sys.modules:
        raise ShimError("the fake-CUDA shim must be loaded before torch is imported (start a fresh process)")
    lib = ctypes.CDLL(str(_build(_torch_dir())), mode=ctypes.RTLD_GLOBAL)
    if lib.moe_dist_fake_cuda_hooks_built() != 1:
        raise ShimError("the fake-CUDA shim loaded, but torch did not pick up its CUDA hooks")
    _loaded = True
    return True


# ---- what runs after torch is imported ----------------------------------------------------------------


class _DeviceProperties:
    """What ``torch.cuda.get_device_properties`` answers (read by a few torch paths: SDPA, FSDP)."""

    def __init__(self, *, name: str, total_memory: int, major: int, minor: int, multi_processor_count: int):
        self.name, self.total_memory, self.major, self.minor = name, total_memory, major, minor
        self.multi_processor_count, self.gcnArchName = multi_processor_count, ""
        self.is_integrated, self.is_multi_gpu_board, self.uuid = False, False, "fake"


class StreamTracker:
    """Which stream is current on this (single) planner thread: collectives issued on a side stream (FSDP2's
    all-gather / reduce-scatter streams) overlap with compute on the default one."""

    def __init__(self):
        self.stack: list = []  # streams entered with ``torch.cuda.stream(...)``
        self.side: set[int] = set()  # ids of the streams created with ``torch.cuda.Stream()``
        self.keep: list = []

    @property
    def on_side_stream(self) -> bool:
        return bool(self.stack) and id(self.stack[-1]) in self.side


def _cuda_factories_into(fake_mode):
    """A TorchFunctionMode: tensor factories asked for a cuda device while ``fake_mode`` is not active (FSDP2
    allocates an empty all-gather buffer when ``fully_shard`` runs on the meta model) run inside it, as a CUDA
    build would create them on the device."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    factories = {
        torch.empty,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.empty_strided,
        torch.tensor,
        torch.arange,
    }

    class CudaFactoriesIntoFakeMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            device = kwargs.get("device")
            on_cuda = func in factories and device is not None and torch.device(device).type == "cuda"
            if on_cuda and not any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack()):
                with fake_mode:
                    return func(*args, **kwargs)
            return func(*args, **kwargs)

    return CudaFactoriesIntoFakeMode()


@contextlib.contextmanager
def fake_cuda_env(
    *, device_count: int, total_memory: int, name: str = "fake-gpu", capability=(9, 0), fake_mode=None
):
    """torch.cuda patched for planning on fake devices. ``torch.cuda.is_available()`` stays False, so
    FakeTensorMode never initialises a real device. Enough for ``torch.autocast("cuda")`` (its constructor
    checks availability), ``dist`` collectives on cuda tensors, FSDP2's streams and events, and memory queries
    (answered by the planner's own tracker, nothing is allocated). Yields the StreamTracker."""
    from unittest import mock

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    props = _DeviceProperties(
        name=name,
        total_memory=total_memory,
        major=capability[0],
        minor=capability[1],
        multi_processor_count=132,
    )
    streams = StreamTracker()
    default = torch.Stream(device="cuda:0")

    def side_stream(device=None, priority=0, **kwargs):
        stream = torch.Stream(device="cuda:0", priority=priority)
        streams.side.add(id(stream))
        streams.keep.append(stream)  # ids stay unique while the planner runs
        return stream

    @contextlib.contextmanager
    def use_stream(stream):
        streams.stack.append(stream)
        try:
            yield stream
        finally:
            streams.stack.pop()

    patches = {
        "torch.cuda.amp.common.amp_definitely_not_available": lambda: False,
        "torch.cuda.is_bf16_supported": lambda *a, **k: True,
        "torch.cuda.get_device_capability": lambda *a, **k: capability,
        "torch.cuda.get_device_properties": lambda *a, **k: props,
        "torch.cuda.get_device_name": lambda *a, **k: name,
        "torch.cuda.device_count": lambda: device_count,
        "torch.cuda.current_device": lambda: 0,
        "torch.cuda.set_device": lambda *a, **k: None,
        "torch.cuda.synchronize": lambda *a, **k: None,
        "torch.cuda.Stream": side_stream,
        "torch.cuda.current_stream": lambda device=None: streams.stack[-1] if streams.stack else default,
        "torch.cuda.default_stream": lambda device=None: default,
        "torch.cuda.stream": lambda s: use_stream(s) if s is not None else contextlib.nullcontext(),
        "torch.cuda.Event": lambda *a, **k: torch.Event(device="cuda:0"),
        "torch.cuda.memory_allocated": lambda *a, **k: 0,
        "torch.cuda.max_memory_allocated": lambda *a, **k: 0,
        "torch.cuda.memory_reserved": lambda *a, **k: 0,
        "torch.cuda.reset_peak_memory_stats": lambda *a, **k: None,
        "torch.cuda.empty_cache": lambda: None,
        "torch.cuda.mem_get_info": lambda *a, **k: (total_memory, total_memory),
    }
    # DTensor's sharding propagation builds global-shape placeholder tensors in the active fake mode
    # (detect_fake_mode()), i.e. in ours, and every tracker would count them: a private mode keeps them apart.
    private = FakeTensorMode(allow_non_fake_inputs=True)
    patches["torch.distributed.tensor._sharding_prop.detect_fake_mode"] = lambda *a, **k: private
    with contextlib.ExitStack() as stack:
        for target, fn in patches.items():
            stack.enter_context(mock.patch(target, fn))
        if fake_mode is not None:
            stack.enter_context(_cuda_factories_into(fake_mode))
        yield streams
