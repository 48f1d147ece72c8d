"""Router math against small cases computed by hand with plain Python ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.moe.router import Router

E, D = 3, 2
W = [[1.0, 0.0], [2.0, 0.5], [0.0, 3.0]]
X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
LOGITS = [[1.0, 2.0, 0.0], [0.0, 0.5, 3.0], [1.0, 2.5, 3.0]]  # X @ W^T
TOP2 = [[1, 0], [2, 1], [2, 1]]
TOP1 = [[1], [2], [2]]


def softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def logsumexp(row):
    return math.log(sum(math.exp(v) for v in row))


def make_router(top_k=2, weight=W, **kw) -> Router:
    cfg = MoEConfig(num_experts=len(weight), top_k=top_k, **kw)
    r = Router(len(weight[0]), cfg)
    with torch.no_grad():
        r.weight.copy_(torch.tensor(weight))
    return r


def x_tensor(rows=X):
    return torch.tensor(rows)


def as_dict(ids_TK, w_TK):
    """Per token {expert id: gate weight}, so the tests do not depend on the order topk returns."""
    return [dict(zip(i, w)) for i, w in zip(ids_TK.tolist(), w_TK.tolist())]


def assert_routes(routing, expected):
    got = as_dict(routing.expert_ids_TK, routing.weights_TK)
    assert [sorted(g) for g in got] == [sorted(e) for e in expected]
    for g, e in zip(got, expected):
        for k, v in e.items():
            assert g[k] == pytest.approx(v, abs=1e-6)


def test_fixture_logits_are_what_the_hand_cases_assume():
    r = make_router()
    torch.testing.assert_close(x_tensor() @ r.weight.detach().T, torch.tensor(LOGITS))


@pytest.mark.parametrize("top_k,ids", [(1, TOP1), (2, TOP2)])
def test_softmax_without_norm_gives_full_softmax_probs(top_k, ids):
    routing = make_router(top_k, norm_topk=False)(x_tensor())
    probs = [softmax(row) for row in LOGITS]
    assert_routes(routing, [{e: p[e] for e in sel} for sel, p in zip(ids, probs)])
    assert routing.weights_TK.dtype == torch.float32


def test_softmax_with_norm_is_softmax_over_selected_logits():
    routing = make_router(2, norm_topk=True)(x_tensor())
    expected = []
    for sel, row in zip(TOP2, LOGITS):
        z = sum(math.exp(row[e]) for e in sel)
        expected.append({e: math.exp(row[e]) / z for e in sel})
    assert_routes(routing, expected)
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(3))


def test_softmax_top1_with_norm_gives_weight_one():
    routing = make_router(1, norm_topk=True)(x_tensor())
    assert_routes(routing, [{i[0]: 1.0} for i in TOP1])


def test_sigmoid_without_bias_selects_by_score():
    routing = make_router(2, router="sigmoid", norm_topk=False)(x_tensor())
    assert_routes(routing, [{e: sigmoid(row[e]) for e in sel} for sel, row in zip(TOP2, LOGITS)])


@pytest.mark.parametrize("norm_topk", [False, True])
def test_sigmoid_bias_steers_selection_but_not_weights(norm_topk):
    r = make_router(2, router="sigmoid", norm_topk=norm_topk)
    r.expert_bias.copy_(torch.tensor([-0.4, 0.0, 0.2]))
    routing = r(x_tensor())
    # Biased scores: token 0 (0.331, 0.881, 0.7) now picks {1, 2}; tokens 1, 2 keep {2, 1}.
    chosen = [[1, 2], [2, 1], [2, 1]]
    expected = []
    for sel, row in zip(chosen, LOGITS):
        w = {e: sigmoid(row[e]) for e in sel}
        if norm_topk:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        expected.append(w)
    assert_routes(routing, expected)
    assert routing.counts_E.tolist() == [0, 3, 3]


def hand_aux(probs, chosen, top_k):
    T = len(probs)
    counts = [sum(sel.count(e) for sel in chosen) for e in range(E)]
    f = [c / (T * top_k) for c in counts]
    P = [sum(p[e] for p in probs) / T for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, P))


@pytest.mark.parametrize("top_k,ids", [(1, TOP1), (2, TOP2)])
def test_softmax_aux_and_z_loss_values(top_k, ids):
    routing = make_router(top_k)(x_tensor())
    probs = [softmax(row) for row in LOGITS]
    assert routing.counts_E.tolist() == [sum(s.count(e) for s in ids) for e in range(E)]
    assert routing.aux_loss.item() == pytest.approx(hand_aux(probs, ids, top_k), rel=1e-6)
    z = sum(logsumexp(row) ** 2 for row in LOGITS) / len(LOGITS)
    assert routing.z_loss.item() == pytest.approx(z, rel=1e-6)


def test_aux_loss_of_perfectly_balanced_uniform_router_is_one():
    r = make_router(1, weight=[[0.0, 0.0]] * 3)
    routing = r(torch.randn(6, 2))
    # Every P_e is 1/3 and Σ f_e = 1, so E·Σ f_e·P_e = 1 whichever expert topk picks on the tie.
    assert routing.aux_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert routing.z_loss.item() == pytest.approx(math.log(3) ** 2, rel=1e-6)


def test_sigmoid_aux_loss_uses_normalised_scores_and_biased_counts():
    r = make_router(2, router="sigmoid")
    r.expert_bias.copy_(torch.tensor([-0.4, 0.0, 0.2]))
    routing = r(x_tensor())
    probs = []
    for row in LOGITS:
        s = [sigmoid(v) for v in row]
        probs.append([v / sum(s) for v in s])
    chosen = [[1, 2], [2, 1], [2, 1]]
    assert routing.aux_loss.item() == pytest.approx(hand_aux(probs, chosen, 2), rel=1e-6)


def test_single_token_losses():
    routing = make_router(2)(x_tensor([X[1]]))
    p = softmax(LOGITS[1])
    # f = (0, 1/2, 1/2) over experts {2, 1}
    assert routing.aux_loss.item() == pytest.approx(E * (p[1] + p[2]) / 2, rel=1e-6)
    assert routing.z_loss.item() == pytest.approx(logsumexp(LOGITS[1]) ** 2, rel=1e-6)


def test_zero_tokens_give_zero_losses_and_counts():
    routing = make_router(2)(torch.zeros(0, D))
    assert routing.expert_ids_TK.shape == (0, 2)
    assert routing.counts_E.tolist() == [0, 0, 0]
    assert routing.aux_loss.item() == 0.0
    assert routing.z_loss.item() == 0.0


def test_zero_coefficients_give_zero_losses():
    routing = make_router(2, aux_loss_coef=0.0, z_loss_coef=0.0)(x_tensor())
    assert routing.aux_loss.item() == 0.0
    assert routing.z_loss.item() == 0.0
    routing = make_router(2, aux_loss_coef=0.0, z_loss_coef=1.0)(x_tensor())
    assert routing.aux_loss.item() == 0.0
    assert routing.z_loss.item() > 0.0


def reference_losses64(w64, x64, counts, top_k):
    logits = x64 @ w64.T
    T = logits.shape[0]
    f = counts.double() / (T * top_k)
    aux = E * (f * logits.softmax(-1).mean(0)).sum()
    z = logits.logsumexp(-1).square().mean()
    return aux, z


def test_router_loss_gradient_matches_float64_reference_and_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(5, D)
    r = make_router(2, weight=torch.randn(E, D).tolist())
    routing = r(x)
    (routing.aux_loss + 0.5 * routing.z_loss).backward()
    grad = r.weight.grad.clone()

    w64 = r.weight.detach().double().requires_grad_(True)
    aux, z = reference_losses64(w64, x.double(), routing.counts_E, 2)
    (aux + 0.5 * z).backward()
    torch.testing.assert_close(grad.double(), w64.grad, atol=1e-6, rtol=1e-5)

    eps = 1e-2
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(E):
            for j in range(D):
                vals = []
                for s in (1, -1):
                    r.weight[i, j] += s * eps
                    out = r(x)
                    assert torch.equal(out.counts_E, routing.counts_E)
                    vals.append((out.aux_loss + 0.5 * out.z_loss).item())
                    r.weight[i, j] -= s * eps
                fd[i, j] = (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close(grad, fd, atol=2e-3, rtol=1e-2)
    assert grad.abs().max() > 1e-2


def test_update_bias_moves_by_exactly_the_rate():
    r = make_router(2, router="sigmoid", bias_update_rate=0.125)
    counts = torch.tensor([5, 1, 3])  # mean 3: expert 0 overloaded, 1 underloaded, 2 exactly balanced
    r.update_bias(counts)
    assert r.expert_bias.tolist() == [-0.125, 0.125, 0.0]
    r.update_bias(counts)
    assert r.expert_bias.tolist() == [-0.25, 0.25, 0.0]
    r.update_bias(torch.tensor([2, 2, 2]))
    assert r.expert_bias.tolist() == [-0.25, 0.25, 0.0]
    assert r.expert_bias.dtype == torch.float32


def test_update_bias_is_a_noop_for_softmax_or_zero_rate():
    r = make_router(2, router="softmax", bias_update_rate=0.125)
    r.update_bias(torch.tensor([5, 1, 3]))
    assert r.expert_bias.tolist() == [0.0, 0.0, 0.0]
    r = make_router(2, router="sigmoid", bias_update_rate=0.0)
    r.update_bias(torch.tensor([5, 1, 3]))
    assert r.expert_bias.tolist() == [0.0, 0.0, 0.0]


def test_expert_bias_is_a_buffer_not_a_parameter():
    r = make_router(2, router="sigmoid")
    assert "expert_bias" in dict(r.named_buffers())
    assert "expert_bias" not in dict(r.named_parameters())


NOISE_W = [[0.5, 0.0], [0.0, -1.0], [1.0, 1.0]]


def make_noisy_router():
    r = make_router(2, norm_topk=False, noisy_gate=True)
    with torch.no_grad():
        r.noise_weight.copy_(torch.tensor(NOISE_W))
    return r


def test_noisy_gate_eval_is_deterministic_and_equals_plain_router():
    noisy, plain = make_noisy_router().eval(), make_router(2, norm_topk=False).eval()
    a, b, c = noisy(x_tensor()), noisy(x_tensor()), plain(x_tensor())
    for u in (b, c):
        assert torch.equal(a.expert_ids_TK, u.expert_ids_TK)
        assert torch.equal(a.weights_TK, u.weights_TK)
        assert a.z_loss.item() == u.z_loss.item()
    probs = [softmax(row) for row in LOGITS]
    assert_routes(a, [{e: p[e] for e in sel} for sel, p in zip(TOP2, probs)])


def test_noisy_gate_training_adds_softplus_scaled_gaussian_noise():
    r = make_noisy_router().train()
    torch.manual_seed(123)
    noise = torch.randn(3, E).tolist()
    torch.manual_seed(123)
    routing = r(x_tensor())
    expected = []
    for row, xr, nz in zip(LOGITS, X, noise):
        std = [math.log1p(math.exp(sum(a * b for a, b in zip(wn, xr)))) for wn in NOISE_W]
        noisy = [v + n * s for v, n, s in zip(row, nz, std)]
        p = softmax(noisy)
        sel = sorted(range(E), key=lambda e, p=p: -p[e])[:2]
        expected.append({e: p[e] for e in sel})
    assert_routes(routing, expected)
    clean = [softmax(row) for row in LOGITS]
    assert any(
        abs(w - clean[t][e]) > 1e-3
        for t, d in enumerate(as_dict(routing.expert_ids_TK, routing.weights_TK))
        for e, w in d.items()
    )
