"""The routing a plan assumes, handed to the dispatcher through its seam (``TokenDispatcher.counts_to_host``).

Fake tensors carry no values, so the one host sync of an MoE layer (the all-gathered expert counts that size
the all-to-all) has nothing to read. The planner answers it instead: every rank routes its T·K token copies
with the same per-expert counts, uniform, or with expert ``hot`` getting ``skew`` times the mean. The EP rank
owning expert ``hot`` then receives the most rows: the worst rank under that skew.
"""

from __future__ import annotations

from torch import nn

from moe_dist.moe.layer import MoELayer


def skewed_counts(*, tokens: int, top_k: int, num_experts: int, skew: float = 1.0, hot: int = 0) -> list[int]:
    """Token copies per expert on one rank (sum tokens·top_k): expert ``hot`` gets ``skew`` times the mean
    (at most ``tokens``: a token picks an expert once), the others share the rest as evenly as integers allow."""
    copies = tokens * top_k
    hot_count = min(tokens, round(skew * copies / num_experts))
    rest, others = copies - hot_count, num_experts - 1
    row = [rest // others + (1 if i < rest % others else 0) for i in range(others)] if others else []
    row.insert(hot, hot_count)
    assert sum(row) == copies and max(row) <= tokens, (row, tokens)
    return row


def max_skew(*, top_k: int, num_experts: int) -> float:
    """The largest skew top-k routing allows: every token picks the hottest expert."""
    return num_experts / top_k


class PlannedRouting:
    """Installed on every MoE layer's dispatcher; reports each answer as a host sync to ``on_sync``."""

    def __init__(self, *, tokens: int, skew: float, on_sync=None):
        self.tokens, self.skew, self.on_sync = tokens, skew, on_sync

    def install(self, model: nn.Module) -> int:
        """Hooks every MoE layer of ``model``; returns how many."""
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        for layer in layers:
            row = skewed_counts(
                tokens=self.tokens,
                top_k=layer.router.top_k,
                num_experts=layer.cfg.num_experts,
                skew=self.skew,
            )
            capacity = layer.capacity(self.tokens)
            if capacity is not None:
                row = [min(n, capacity) for n in row]
            layer.dispatcher.counts_to_host = self._answer(row)
        return len(layers)

    def _answer(self, row: list[int]):
        def counts_to_host(counts) -> list[int]:
            assert counts.numel() % len(row) == 0, (tuple(counts.shape), len(row))
            if self.on_sync is not None:
                self.on_sync("routing_counts")  # a GPU blocks here: the layer's one device-to-host sync
            return row * (counts.numel() // len(row))  # [E], or the all-gathered [ep * E]

        return counts_to_host


class ReplayedRouting:
    """Answers the dispatchers' count reads with recorded ones, in call order (validation against a real run:
    the same routing, so the same all-to-all bytes)."""

    def __init__(self, answers: list[list[int]], *, on_sync=None):
        self.answers, self.on_sync = list(answers), on_sync

    def install(self, model: nn.Module) -> int:
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        for layer in layers:
            layer.dispatcher.counts_to_host = self._next
        return len(layers)

    def _next(self, counts) -> list[int]:
        answer = self.answers.pop(0)
        assert len(answer) == counts.numel(), (len(answer), tuple(counts.shape))
        if self.on_sync is not None:
            self.on_sync("routing_counts")
        return answer
