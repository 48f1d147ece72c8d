"""The routing a plan assumes, handed to the dispatcher through its seam (``TokenDispatcher.exchange_counts``).

Fake tensors carry no values, so the one host sync of an MoE layer (the all-gathered expert counts that size
the all-to-all; without an exchange, the counts the expert loop splits by) has nothing to read. The planner
wraps it: the dispatcher's own ``exchange_counts`` runs (its all-gather and its host read are recorded), and
the planned counts replace what it read: every rank routes its T·K token copies alike, uniform, or with
expert ``hot`` getting ``skew`` times the mean. The EP rank owning expert ``hot`` then receives the most rows:
the worst rank under that skew. With ``model.moe.overlap_chunks`` = C the counts come per chunk of tokens
(in proportion to each chunk's tokens, as the dispatcher cuts them).
"""

from __future__ import annotations

import contextlib

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


def planned_counts(
    *, tokens: int, chunks: int, top_k: int, num_experts: int, skew: float, capacity: int | None
) -> list[list[int]]:
    """Kept copies per (chunk, expert) on one rank: the rank's ``skewed_counts`` (capped at ``capacity``),
    each expert's copies split over the chunks in proportion to their tokens (chunk c holds the tokens t with
    floor(t·C/T) = c, as the dispatcher cuts them), so chunking changes no total."""
    if tokens == 0:
        return [[0] * num_experts for _ in range(chunks)]
    row = skewed_counts(tokens=tokens, top_k=top_k, num_experts=num_experts, skew=skew)
    if capacity is not None:
        row = [min(n, capacity) for n in row]
    ends = [sum(1 for t in range(tokens) if t * chunks // tokens <= c) for c in range(chunks)]
    starts = [0, *ends[:-1]]
    return [[n * end // tokens - n * start // tokens for n in row] for start, end in zip(starts, ends)]


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


class PlannedRouting:
    """Installed on every MoE layer's dispatcher: its own ``exchange_counts`` still runs (the all-gather of the
    counts and the host read a GPU would do, recorded as the "routing_counts" sync under ``labelled``), and
    the planned counts replace the values it read (a fake tensor has none)."""

    def __init__(self, *, tokens: int, skew: float, labelled=contextlib.nullcontext):
        self.tokens, self.skew, self.labelled = tokens, skew, labelled

    def install(self, model: nn.Module) -> int:
        """Hooks every MoE layer of ``model``; returns how many."""
        layers = _moe_layers(model)
        for layer in layers:
            layer.dispatcher.exchange_counts = self._answer(layer)
        return len(layers)

    def _answer(self, layer: MoELayer):
        dispatcher, real = layer.dispatcher, layer.dispatcher.exchange_counts

        def exchange_counts(kept_CE) -> list[list[list[int]]]:
            with self.labelled("routing_counts"):
                read = real(kept_CE)  # the collective and the sync; the values read are meaningless
            row_CE = planned_counts(
                tokens=self.tokens,
                chunks=kept_CE.shape[0],
                top_k=layer.router.top_k,
                num_experts=kept_CE.shape[1],
                skew=self.skew,
                capacity=layer.capacity(self.tokens),
            )
            assert len(read) == (dispatcher.ep if dispatcher.group is not None else 1)
            return [[list(row) for row in row_CE] for _ in read]

        return exchange_counts


class ReplayedRouting:
    """Answers the dispatchers' count reads with recorded ones, in call order (validation against a real run:
    the same routing, so the same all-to-all bytes); the dispatchers' own ``exchange_counts`` still runs."""

    def __init__(self, answers: list[list[list[list[int]]]], *, labelled=contextlib.nullcontext):
        self.answers, self.labelled = list(answers), labelled

    def install(self, model: nn.Module) -> int:
        layers = _moe_layers(model)
        for layer in layers:
            layer.dispatcher.exchange_counts = self._replay(layer.dispatcher.exchange_counts)
        return len(layers)

    def _replay(self, real):
        def exchange_counts(kept_CE) -> list[list[list[int]]]:
            with self.labelled("routing_counts"):
                read = real(kept_CE)
            answer = self.answers.pop(0)
            assert len(answer) == len(read) and len(answer[0]) == len(read[0]), (len(answer), len(read))
            return answer

        return exchange_counts
