"""Single-process dispatch / combine, grouped experts, and the full MoE layer against a naive reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import MoEConfig
from moe_dist.moe.dispatch import ExpertRows, TokenDispatcher, segment_index, sort_copies_by_expert
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer

TOL = {"atol": 1e-5, "rtol": 1e-5}


def counts_of(ids_TK, num_experts):
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def distinct_rows(T, D):
    return torch.arange(T * D, dtype=torch.float32).reshape(T, D) + 1.0


def test_segment_index_hand_case():
    idx = segment_index(torch.tensor([5, 0, 2]), torch.tensor([2, 0, 3]), 5)
    assert idx.tolist() == [5, 6, 2, 3, 4]
    idx = segment_index(torch.tensor([3, 0]), torch.tensor([1, 2]), 3)
    assert idx.tolist() == [3, 0, 1]


def test_segment_index_empty():
    assert segment_index(torch.tensor([4, 1]), torch.tensor([0, 0]), 0).tolist() == []


def test_sort_copies_by_expert_hand_case():
    ids = torch.tensor([[1, 0], [0, 1], [2, 0]])
    weights = torch.tensor([[0.2, 0.8], [0.5, 0.9], [0.3, 0.6]])
    # flat copies: 0:(e1,.2) 1:(e0,.8) 2:(e0,.5) 3:(e1,.9) 4:(e2,.3) 5:(e0,.6)
    assert sort_copies_by_expert(ids, weights, by_gate=False).tolist() == [1, 2, 5, 0, 3, 4]
    assert sort_copies_by_expert(ids, weights, by_gate=True).tolist() == [1, 5, 2, 3, 0, 4]


def test_sort_copies_by_gate_breaks_ties_by_copy_order():
    ids = torch.tensor([[0], [0], [0], [0]])
    weights = torch.tensor([[0.5], [0.9], [0.5], [0.5]])
    assert sort_copies_by_expert(ids, weights, by_gate=True).tolist() == [1, 0, 2, 3]


def test_dispatch_sorts_rows_by_expert_and_counts_tokens():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 3]])
    x = distinct_rows(4, 3)
    d = TokenDispatcher(4).dispatch(x, ids, torch.ones(4, 2), counts_of(ids, 4), capacity=None)
    # expert 0: tokens 0, 1, 3; expert 1: 1, 2; expert 2: 0, 2; expert 3: 3
    expected_tokens = [0, 1, 3, 1, 2, 0, 2, 3]
    assert d.plan.token_idx_M.tolist() == expected_tokens
    assert torch.equal(d.x_RD, x[expected_tokens])
    assert d.rows.host_counts() == [[3, 2, 2, 1]]
    assert d.num_dropped is None


@pytest.mark.parametrize("capacity", [None, 100])
def test_round_trip_with_identity_experts_gives_k_times_x(capacity):
    torch.manual_seed(0)
    T, D, E, K = 9, 5, 6, 3
    x = torch.randn(T, D)
    ids = torch.rand(T, E).topk(K, dim=-1).indices
    disp = TokenDispatcher(E)
    d = disp.dispatch(x, ids, torch.ones(T, K), counts_of(ids, E), capacity=capacity)
    assert d.x_RD.shape == (T * K, D)
    tokens_per_expert = d.rows.tokens_per_expert(x.device)
    assert tokens_per_expert.tolist() == counts_of(ids, E).tolist()
    experts_of_rows = torch.repeat_interleave(torch.arange(E), tokens_per_expert)
    assert torch.equal(ids.reshape(-1).sort().values, experts_of_rows)
    out = disp.combine(d.x_RD, d)
    torch.testing.assert_close(out, K * x, **TOL)
    if capacity is not None:
        assert d.num_dropped == 0
        assert d.rows.counts_PL == [tokens_per_expert.tolist()]


def test_capacity_keeps_highest_gate_copies_top1():
    # Expert 0 receives 5 copies (tokens 0, 2, 3, 4, 6), expert 1 receives 2 (tokens 1, 5); capacity 2.
    ids = torch.tensor([[0], [1], [0], [0], [0], [1], [0]])
    w = torch.tensor([[0.3], [0.4], [0.9], [0.1], [0.7], [0.6], [0.5]])
    x = distinct_rows(7, 2)
    disp = TokenDispatcher(2)
    d = disp.dispatch(x, ids, w, counts_of(ids, 2), capacity=2)
    assert d.plan.token_idx_M.tolist() == [2, 4, 5, 1]
    assert d.plan.weights_M.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.4])
    assert d.rows.tokens_per_expert(x.device).tolist() == [2, 2]
    assert d.rows.counts_PL == [[2, 2]]
    assert d.num_dropped == 3
    assert torch.equal(d.x_RD, x[[2, 4, 5, 1]])
    out = disp.combine(d.x_RD, d)
    expected = torch.zeros_like(x)
    for t, g in [(2, 0.9), (4, 0.7), (5, 0.6), (1, 0.4)]:
        expected[t] = g * x[t]
    torch.testing.assert_close(out, expected, **TOL)
    assert out[[0, 3, 6]].abs().max().item() == 0.0


def test_capacity_drops_single_copies_of_a_token_top2():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    x = distinct_rows(4, 3)
    disp = TokenDispatcher(3)
    d = disp.dispatch(x, ids, w, counts_of(ids, 3), capacity=2)
    # expert 0 keeps t1 (.7), t0 (.6); expert 1 keeps t3 (.9), t2 (.8) and drops t0 (.4); expert 2 keeps t1.
    assert d.plan.token_idx_M.tolist() == [1, 0, 3, 2, 1]
    assert d.rows.host_counts() == [[2, 2, 1]]
    assert d.num_dropped == 3
    out = disp.combine(d.x_RD, d)
    expected = torch.stack([0.6 * x[0], 1.0 * x[1], 0.8 * x[2], 0.9 * x[3]])
    torch.testing.assert_close(out, expected, **TOL)


def test_capacity_zero_drops_everything():
    ids = torch.tensor([[0], [1]])
    disp = TokenDispatcher(2)
    d = disp.dispatch(torch.ones(2, 3), ids, torch.ones(2, 1), counts_of(ids, 2), capacity=0)
    assert d.x_RD.shape == (0, 3)
    assert d.num_dropped == 2
    assert disp.combine(d.x_RD, d).abs().sum().item() == 0.0


def test_combine_gradients_reach_gate_weights_and_rows():
    ids = torch.tensor([[0, 1], [1, 0]])
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    disp = TokenDispatcher(2)
    d = disp.dispatch(x, ids, w, counts_of(ids, 2), capacity=None)
    out = disp.combine(2.0 * d.x_RD, d)
    out.sum().backward()
    # out[t] = Σ_k 2·w_tk·x_t → d/dw_tk = 2·Σ_d x_td, d/dx_td = 2·Σ_k w_tk
    assert w.grad.tolist() == [[6.0, 6.0], [14.0, 14.0]]
    assert x.grad.tolist() == [[2.0, 2.0], [2.0, 2.0]]


@pytest.mark.parametrize(
    "cf,tokens,top_k,experts,expected",
    [
        (None, 10, 2, 8, None),
        (1.25, 10, 2, 8, 4),
        (1.0, 8, 2, 4, 4),
        (0.01, 3, 1, 4, 1),
        (2.0, 0, 2, 4, 0),
        (1.5, 7, 3, 5, 7),
    ],
)
def test_layer_capacity(cf, tokens, top_k, experts, expected):
    cfg = MoEConfig(
        num_experts=experts, top_k=top_k, expert_hidden=4, capacity_factor=cf, norm_topk=top_k > 1
    )
    layer = MoELayer(4, cfg)
    assert layer.capacity(tokens) == expected


def test_layer_capacity_is_exact_for_decimal_factors():
    layer = MoELayer(4, MoEConfig(num_experts=5, top_k=2, expert_hidden=4, capacity_factor=1.1))
    assert layer.capacity(25) == 11


def expert_weights(L, D, Fh, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, D, 2 * Fh, generator=g) * 0.5, torch.randn(L, Fh, D, generator=g) * 0.5


def run_experts(mode, w_gu, w_d, x, tpe):
    L, D, F2 = w_gu.shape
    experts = GroupedExperts(L, D, F2 // 2, grouped_mm=mode)
    with torch.no_grad():
        experts.w_gate_up.copy_(w_gu)
        experts.w_down.copy_(w_d)
    x = x.clone().requires_grad_(True)
    y = experts(x, ExpertRows([tpe]))
    torch.manual_seed(1)
    (y * torch.randn_like(y)).sum().backward()
    return y.detach(), x.grad, experts.w_gate_up.grad, experts.w_down.grad


@pytest.mark.parametrize("tpe", [[3, 0, 5, 2], [0, 0, 7, 0], [0, 0, 0, 0]])
def test_grouped_mm_matches_loop(tpe):
    L, D, Fh = 4, 8, 4
    w_gu, w_d = expert_weights(L, D, Fh)
    torch.manual_seed(0)
    x = torch.randn(sum(tpe), D)
    on = run_experts("on", w_gu, w_d, x, tpe)
    off = run_experts("off", w_gu, w_d, x, tpe)
    for a, b in zip(on, off):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL)
    for e, n in enumerate(tpe):
        if n == 0:
            assert on[2][e].abs().max().item() == 0.0
            assert on[3][e].abs().max().item() == 0.0
    if sum(tpe) > 0:
        assert off[0].abs().max() > 0.1

    start = 0
    for e, n in enumerate(tpe):
        gate, up = (x[start : start + n] @ w_gu[e]).chunk(2, dim=-1)
        torch.testing.assert_close(on[0][start : start + n], (F.silu(gate) * up) @ w_d[e], **TOL)
        start += n


@pytest.mark.parametrize("dim,hidden", [(6, 4), (8, 6)])
def test_grouped_mm_on_rejects_unaligned_shapes(dim, hidden):
    experts = GroupedExperts(2, dim, hidden, grouped_mm="on")
    with pytest.raises(ValueError, match=f"dim={dim} and expert_hidden={hidden}"):
        experts(torch.randn(3, dim), ExpertRows([[1, 2]]))
    assert not GroupedExperts(2, dim, hidden, grouped_mm="auto").uses_grouped_mm(torch.float32, CUDA)


def test_expert_rows_segments_and_expert_major_order():
    rows = ExpertRows([[2, 0, 1], [1, 3, 0]])  # rows of (source 0: e0 e0 e2) then (source 1: e0 e1 e1 e1)
    assert rows.segments() == [[(0, 2), (3, 1)], [(4, 3)], [(2, 1)]]
    assert rows.expert_major_order().tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert rows.tokens_per_expert(CPU).tolist() == [3, 3, 1]
    assert ExpertRows([[2, 1]]).expert_major_order() is None  # one source: already expert-major
    assert ExpertRows([[0, 0], [0, 0]]).expert_major_order().tolist() == []


SEGMENT_COUNTS = [[[3, 0, 2], [1, 4, 0], [0, 2, 5]], [[0, 0, 0], [2, 0, 1]], [[0, 0, 0]]]


def naive_experts(x_RD, counts_PL, w_gu, w_d):
    """Row by row: each row through the SwiGLU of the expert its segment belongs to."""
    experts_of_rows = [e for row in counts_PL for e, n in enumerate(row) for _ in range(n)]
    out = []
    for r, e in enumerate(experts_of_rows):
        gate, up = (x_RD[r] @ w_gu[e]).chunk(2)
        out.append((F.silu(gate) * up) @ w_d[e])
    return torch.stack(out) if out else x_RD.new_zeros((0, x_RD.shape[1]))


@pytest.mark.parametrize("counts_PL", SEGMENT_COUNTS)
@pytest.mark.parametrize("mode", ["off", "on"])
def test_experts_read_source_major_segments(counts_PL, mode):
    """Rows in (source, expert) order: the segment loop (no reorder) and grouped_mm (reorder) both give each
    row its own expert's output and the reference gradients."""
    L, D, Fh = 3, 8, 4
    w_gu, w_d = expert_weights(L, D, Fh)
    torch.manual_seed(0)
    x = torch.randn(sum(map(sum, counts_PL)), D)
    g = torch.randn(x.shape[0], D)
    experts = GroupedExperts(L, D, Fh, grouped_mm=mode)
    with torch.no_grad():
        experts.w_gate_up.copy_(w_gu)
        experts.w_down.copy_(w_d)
    x1 = x.clone().requires_grad_(True)
    y = experts(x1, ExpertRows(counts_PL))
    (y * g).sum().backward()
    x2, w_gu2, w_d2 = (t.clone().requires_grad_(True) for t in (x, w_gu, w_d))
    y_ref = naive_experts(x2, counts_PL, w_gu2, w_d2)
    ((y_ref * g).sum() + 0.0 * (x2.sum() + w_gu2.sum() + w_d2.sum())).backward()  # zero grads when no rows
    torch.testing.assert_close(y, y_ref, **TOL)
    if x.shape[0]:
        assert y_ref.abs().max() > 0.1
    for got, want in [
        (x1.grad, x2.grad),
        (experts.w_gate_up.grad, w_gu2.grad),
        (experts.w_down.grad, w_d2.grad),
    ]:
        torch.testing.assert_close(got, want, **TOL)


def test_segment_experts_and_weighted_sum_pass_gradcheck():
    """fp64 finite differences against the hand-written backwards."""
    from moe_dist.moe.dispatch import _WeightedSum
    from moe_dist.moe.experts import _SegmentSwiGLU

    gen = torch.Generator().manual_seed(3)
    rows = ExpertRows([[2, 0, 1], [1, 2, 0]])
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w_gu = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w_d = torch.randn(3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _SegmentSwiGLU.apply(*t, rows.segments()), (x, w_gu, w_d))
    y = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, generator=gen, requires_grad=True)
    tokens = torch.tensor([2, 0, 2, 1, 4, 0, 2])
    expected = torch.zeros(5, 4, dtype=torch.float64).index_add(0, tokens, y * w[:, None])
    out = _WeightedSum.apply(y, w, tokens, 5)
    assert out.dtype == torch.float64  # summed in the gate weights' dtype
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda y, w: _WeightedSum.apply(y, w, tokens, 5), (y, w))


def test_weighted_sum_blocks_equal_one_pass(monkeypatch):
    """The CPU block loop adds the same rows in the same order as one index_add (bitwise)."""
    from moe_dist.moe import dispatch

    torch.manual_seed(0)
    y, w = torch.randn(300, 16), torch.rand(300)
    tokens = torch.randint(0, 40, (300,))
    one_pass = torch.zeros(40, 16).index_add(0, tokens, y * w[:, None])
    monkeypatch.setattr(dispatch, "COMBINE_BLOCK_BYTES", 7 * 4 * 16)  # 7 rows per block
    assert torch.equal(dispatch.weighted_sum(y, w, tokens, num_tokens=40), one_pass)


def test_send_order_by_chunk_then_expert_with_capacity():
    from moe_dist.moe.dispatch import send_order

    # 4 tokens, top-2, 3 experts, 2 chunks (tokens 0-1, 2-3)
    ids = torch.tensor([[0, 1], [1, 2], [0, 1], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    counts = counts_of(ids, 3)
    order, kept = send_order(ids, w, counts, capacity=None, chunks=2)
    # copies: 0:(t0,e0) 1:(t0,e1) 2:(t1,e1) 3:(t1,e2) | 4:(t2,e0) 5:(t2,e1) 6:(t3,e1) 7:(t3,e0)
    assert order.tolist() == [0, 1, 2, 3, 4, 7, 5, 6]
    assert kept.tolist() == [[1, 2, 1], [2, 2, 0]]
    # capacity 2: expert 0 keeps t0 (.6) and t2 (.2) over t3 (.1); expert 1 keeps t3 (.9), t2 (.8)
    order, kept = send_order(ids, w, counts, capacity=2, chunks=2)
    assert kept.tolist() == [[1, 0, 1], [1, 2, 0]]
    assert order[:5].tolist() == [0, 3, 4, 6, 5]  # chunk 0: e0 t0, e2 t1 | chunk 1: e0 t2, e1 t3, t2
    assert sorted(order[5:].tolist()) == [1, 2, 7]  # the dropped copies come last
    order, kept = send_order(ids, w, counts, capacity=2, chunks=1)
    assert kept.tolist() == [[2, 2, 1]]
    assert order[:5].tolist() == [0, 4, 6, 5, 3]  # gate priority within each expert


CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # only compared by type: no CUDA needed


def test_grouped_mm_mode_selection():
    # CUDA grouped_mm takes bf16 only: fp32 / fp64 experts loop (found by the planner on fake CUDA).
    assert not GroupedExperts(2, 8, 4, grouped_mm="auto").uses_grouped_mm(torch.float32, CUDA)
    with pytest.raises(ValueError, match="grouped_mm='on': CUDA grouped_mm needs bf16"):
        GroupedExperts(2, 8, 4, grouped_mm="on").uses_grouped_mm(torch.float32, CUDA)
    assert GroupedExperts(2, 8, 8, grouped_mm="auto").uses_grouped_mm(torch.bfloat16, CUDA)
    assert not GroupedExperts(2, 8, 4, grouped_mm="auto").uses_grouped_mm(torch.bfloat16, CUDA)
    assert not GroupedExperts(2, 8, 4, grouped_mm="auto").uses_grouped_mm(torch.float32, CPU)  # loop faster
    assert GroupedExperts(2, 8, 4, grouped_mm="on").uses_grouped_mm(torch.float32, CPU)
    assert not GroupedExperts(2, 8, 4, grouped_mm="off").uses_grouped_mm(torch.float32, CUDA)


D, HIDDEN, E = 8, 4, 6


def build_layer(top_k, cf, shared, router, grouped_mm="auto", seed=0):
    cfg = MoEConfig(
        num_experts=E,
        top_k=top_k,
        expert_hidden=HIDDEN,
        capacity_factor=cf,
        router=router,
        norm_topk=top_k > 1,
        num_shared_experts=shared,
        grouped_mm=grouped_mm,
    )
    torch.manual_seed(seed)
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
        layer.router.weight.normal_(0.0, 1.0)
        if router == "sigmoid":
            layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    return layer


def reference_forward(layer, x):
    """Σ_k gate_k·SwiGLU_e(x) per token with a Python loop, plus shared experts; returns (y, counts, dropped)."""
    cfg = layer.cfg
    K = cfg.top_k
    x_TD = x.reshape(-1, x.shape[-1])
    T = x_TD.shape[0]
    logits = x_TD @ layer.router.weight.T
    if cfg.router == "softmax":
        scores = logits.softmax(-1)
        select = scores
    else:
        scores = logits.sigmoid()
        select = scores + layer.router.expert_bias
    ids = select.topk(K, dim=-1).indices
    gates = scores.gather(-1, ids)
    if cfg.norm_topk:
        gates = gates / gates.sum(-1, keepdim=True)

    keep = {(t, k) for t in range(T) for k in range(K)}
    if cfg.capacity_factor is not None:
        cap = layer.capacity(T)
        keep = set()
        for e in range(E):
            copies = [(t, k) for t in range(T) for k in range(K) if ids[t, k].item() == e]
            copies.sort(key=lambda tk: (-gates[tk].item(), tk[0] * K + tk[1]))
            keep.update(copies[:cap])

    w_gu, w_d = layer.experts.w_gate_up, layer.experts.w_down
    rows = []
    for t in range(T):
        acc = torch.zeros(x_TD.shape[-1])
        for k in range(K):
            if (t, k) not in keep:
                continue
            e = ids[t, k].item()
            h = x_TD[t] @ w_gu[e]
            acc = acc + gates[t, k] * ((F.silu(h[:HIDDEN]) * h[HIDDEN:]) @ w_d[e])
        rows.append(acc)
    y = torch.stack(rows)
    if layer.shared_experts is not None:
        s = layer.shared_experts
        y = y + (F.silu(x_TD @ s.w_gate.weight.T) * (x_TD @ s.w_up.weight.T)) @ s.w_down.weight.T
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return y.reshape(x.shape), counts, T * K - len(keep)


def grads(layer, x):
    return [x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


CASES = [
    *itertools.product([1, 2, 4], [None, 0.5], [0, 2], ["softmax", "sigmoid"], ["auto"]),
    (2, None, 0, "softmax", "off"),
    (2, 0.5, 2, "softmax", "off"),
    (4, 0.5, 0, "sigmoid", "off"),
]


@pytest.mark.parametrize("top_k,cf,shared,router,grouped_mm", CASES)
def test_layer_matches_naive_reference(top_k, cf, shared, router, grouped_mm):
    layer = build_layer(top_k, cf, shared, router, grouped_mm)
    torch.manual_seed(1)
    x = torch.randn(3, 4, D)
    g = torch.randn(3, 4, D)

    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    (y * g).sum().backward()
    got = grads(layer, x1)
    stats = layer.stats
    layer.zero_grad()

    x2 = x.clone().requires_grad_(True)
    y_ref, counts, dropped = reference_forward(layer, x2)
    (y_ref * g).sum().backward()
    want = grads(layer, x2)

    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **TOL)
    assert y_ref.abs().max() > 0.1
    assert stats.counts_E.tolist() == counts.tolist()
    assert stats.num_copies == 12 * top_k
    assert stats.num_dropped == dropped
    if cf is not None:
        assert dropped > 0
    names = ["x"] + [n for n, _ in sorted(layer.named_parameters())]
    for name, a, b in zip(names, got, want):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cf", [None, 1.0])
def test_layer_on_empty_input(cf):
    layer = build_layer(2, cf, 2, "softmax")
    x = torch.zeros(0, D, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, D)
    assert layer.stats.counts_E.tolist() == [0] * E
    assert (layer.stats.num_dropped, layer.stats.num_copies) == (0, 0)
    assert (layer.stats.aux_loss.item(), layer.stats.z_loss.item()) == (0.0, 0.0)
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max().item() == 0.0, name


def test_layer_under_bf16_autocast_keeps_fp32_output_and_gradients():
    """Autocast: rows cross the exchange and the experts in bf16, the combine sums in fp32 (CPU autocast here;
    the same code runs under CUDA autocast)."""
    layer = build_layer(2, None, 1, "softmax", "off")
    torch.manual_seed(1)
    x = torch.randn(3, 4, D)
    x1 = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x1)
    y.float().sum().backward()
    x2 = x.clone().requires_grad_(True)
    y_ref, _, _ = reference_forward(layer, x2)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=0.1, rtol=0.05)  # bf16 rounding of rows and weights
    assert x1.grad.dtype == torch.float32 and layer.experts.w_gate_up.grad.dtype == torch.float32
    assert x1.grad.abs().max() > 0 and layer.experts.w_down.grad.abs().max() > 0


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_grouped_mm_output_is_no_view_and_takes_a_broadcast_gradient():
    """FSDP2 warns on a module output that is a view; grouped_mm's backward refuses the stride-0 gradient of
    y.sum() unless it is made contiguous first (fails with 'Invalid strides/sizes' without the hook)."""
    torch.manual_seed(0)
    experts = GroupedExperts(2, 16, 32, grouped_mm="on")
    torch.nn.init.normal_(experts.w_gate_up)
    torch.nn.init.normal_(experts.w_down)
    x = torch.randn(5, 16, requires_grad=True)
    y = experts(x, ExpertRows([[2, 3]]))
    assert not y._is_view()
    y.sum().backward()
    assert x.grad.abs().sum() > 0
