"""Run guards: a hang watchdog, the non-finite-step policy, and the router-collapse detector."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


class Watchdog:
    """Ends this process when one phase of a step (which contains collectives) runs far past the timeout.

    The process-group timeout already turns most stuck collectives into exceptions; this thread covers
    the rest (a peer that hangs without closing its sockets, a collective the backend never times out), so
    that no rank waits silently forever. The current phase also names the failure in error messages.
    """

    latest: Watchdog | None = None  # the running one, for error messages raised outside the loop

    def __init__(self, *, limit_s: float, rank: int):
        Watchdog.latest = self
        self.limit_s, self.rank = limit_s, rank
        self.step, self.name, self.since = 0, "start-up", None
        self.background_tasks: dict[int, str] = {}  # what background threads run (named in errors, not timed)
        threading.Thread(target=self._watch, name="moe_dist-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        self.step, self.name, self.since = step, name, time.monotonic()
        try:
            yield
        finally:
            self.since = None

    @contextlib.contextmanager
    def background(self, name: str) -> Iterator[None]:
        """Names work of a background thread (an asynchronous checkpoint save) in error messages. Not timed
        here: its collectives run on a group with its own timeout, and whoever waits for it is watched."""
        key = threading.get_ident()
        self.background_tasks[key] = name
        try:
            yield
        finally:
            self.background_tasks.pop(key, None)

    def describe(self) -> str:
        where = f"rank {self.rank}, step {self.step}, during {self.name}"
        tasks = list(self.background_tasks.values())
        return where + (f" (in the background: {'; '.join(tasks)})" if tasks else "")

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.limit_s / 10))
            since = self.since
            if since is not None and time.monotonic() - since > self.limit_s:
                print(
                    f"moe_dist: error: {self.describe()}: no progress for {self.limit_s:.0f} s "
                    "(a peer rank died or hangs); exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)


class NonFiniteError(RuntimeError):
    pass


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """Name and statistic of the first parameter (in module order) whose gradient is not finite on any rank.

    Collective when a process group exists (every rank calls it: the skip decision is global): the only bad
    entries may sit in another rank's shard (engine=fsdp) or in another EP rank's experts.
    """
    params = list(model.named_parameters())
    counts = [
        (~torch.isfinite(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)).sum()
        if p.grad is not None
        else torch.zeros((), dtype=torch.int64)
        for _, p in params
    ]
    if not counts:
        return None
    device = next((p.grad.device for _, p in params if p.grad is not None), torch.device("cpu"))
    bad = torch.stack([c.to(device) for c in counts]).double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    first = (bad > 0).nonzero()
    if len(first) == 0:
        return None
    i = int(first[0].item())
    return f"{params[i][0]} ({int(bad[i].item())} non-finite gradient entries on the rank with the most)"


class NonFiniteGuard:
    """Skips optimizer steps whose global grad norm is not finite, up to ``max_skips``; then stops.

    The global norm is identical on all ranks (NaN and inf survive the all-reduces), so every rank takes
    the same decision without another collective.
    """

    def __init__(self, max_skips: int):
        self.max_skips, self.skipped = max_skips, 0

    def should_skip(self, *, step: int, grad_norm: float, model: nn.Module) -> str | None:
        """None for a healthy step; else a message naming the step, the parameter and the statistic.

        A non-finite loss always reaches the gradients, so the global grad norm is the one test needed.
        """
        if math.isfinite(grad_norm):
            return None
        self.skipped += 1
        where = first_nonfinite_grad(model) or "no single parameter"
        message = f"step {step}: non-finite gradient (global grad_norm={grad_norm}), first in {where}"
        if self.skipped > self.max_skips:
            raise NonFiniteError(
                f"{message}; {self.skipped} such steps > trainer.max_nonfinite_skips={self.max_skips}"
            )
        return f"warning: {message}; step skipped ({self.skipped}/{self.max_skips})"


class CollapseDetector:
    """Counts, per MoE layer and expert, the consecutive steps with no routed tokens (global counts)."""

    def __init__(self, layer_names: list[str], num_experts: int, *, warn_after: int, device):
        self.layer_names, self.warn_after = layer_names, warn_after
        self.streak = torch.zeros(len(layer_names), num_experts, dtype=torch.int64, device=device)
        self.warned: set[tuple[int, int]] = set()

    def update(self, global_counts: torch.Tensor) -> None:
        self.streak = (self.streak + 1) * (global_counts == 0)

    def new_warnings(self) -> list[str]:
        """Host read; call at log steps only."""
        if self.warn_after == 0:
            return []
        collapsed = {tuple(ix) for ix in (self.streak >= self.warn_after).nonzero().tolist()}
        self.warned &= collapsed  # an expert that recovered may warn again later
        messages = [
            f"warning: router collapse? {self.layer_names[layer]} expert {expert} received no tokens for "
            f"{self.streak[layer, expert].item()} steps"
            for layer, expert in sorted(collapsed - self.warned)
        ]
        self.warned |= collapsed
        return messages
