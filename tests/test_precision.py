"""Precision policy and the load-balancing loss scopes, in one process.

- Under bf16 autocast the router still computes in fp32 (the bug: ``F.linear(x.float(), w.float())`` returned
  bf16 under autocast), the rows cross the exchange in bf16 and the combine sums in fp32;
- fp64 mode is float64 end to end: parameters, buffers, router, combine, loss, grad norm, optimizer state;
- the ``sequence`` aux-loss scope equals DeepSeek-V3's formula computed by hand and does not depend on how a
  batch is cut into pieces, while the ``micro_step`` scope does.
Distributed trajectories (fp64 to 1e-9 across world sizes, EP, engines, accumulation splits) are in
tests/test_fsdp_engine.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from training_runs import TINY, compose_config

from moe_dist.config import MoEConfig
from moe_dist.engines import build_engine
from moe_dist.model.build import build_model
from moe_dist.moe import dispatch
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.router import Router
from moe_dist.parallel.apply import global_grad_norm
from moe_dist.parallel.mesh import single_process_mesh
from moe_dist.trainer import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(cfg, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(cfg.model.vocab_size, (batch, cfg.model.seq_len + 1), generator=gen)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_computes_in_fp32_under_bf16_autocast(router):
    torch.manual_seed(0)
    r = Router(64, MoEConfig(num_experts=16, top_k=4, router=router))
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-3e-3, 3e-3, 16))  # steps finer than bf16's ~4e-3 near 0.5-1
    x = torch.randn(256, 64)
    plain = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = r(x)
        mixed_bf16_input = r(x.bfloat16())
    assert mixed.weights_TK.dtype == torch.float32
    assert mixed.aux_loss.dtype == mixed.z_loss.dtype == torch.float32
    assert torch.equal(mixed.expert_ids_TK, plain.expert_ids_TK)
    assert torch.equal(mixed.weights_TK, plain.weights_TK)
    assert torch.equal(mixed.aux_loss, plain.aux_loss)
    # A bf16 input is widened, not the math narrowed: same choices as the fp32 router on the rounded input.
    reference = r(x.bfloat16().float())
    assert torch.equal(mixed_bf16_input.expert_ids_TK, reference.expert_ids_TK)
    assert torch.equal(mixed_bf16_input.weights_TK, reference.weights_TK)


def test_bf16_autocast_forward_exchanges_bf16_rows_and_combines_in_fp32():
    torch.manual_seed(0)
    layer = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    seen = {}

    def experts(x_RD, rows):
        seen["rows"] = x_RD.dtype
        y = layer.experts(x_RD, rows)
        seen["expert_out"] = y.dtype
        return y

    forward = layer.dispatcher.forward

    def dispatcher_forward(*args, **kwargs):
        kwargs["experts"] = experts
        y, plan, rounds = forward(*args, **kwargs)
        seen["combined"], seen["gates"] = y.dtype, plan.weights_M.dtype
        return y, plan, rounds

    layer.dispatcher.forward = dispatcher_forward
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == {
        "rows": torch.bfloat16,
        "expert_out": torch.bfloat16,
        "gates": torch.float32,
        "combined": torch.float32,
    }
    assert y.dtype == torch.float32


def test_fp64_mode_is_float64_end_to_end(monkeypatch):
    cfg = compose_config([*TINY, "trainer.precision=fp64"])
    mesh = single_process_mesh()
    model = build_model(cfg, mesh, torch.device("cpu"))
    floating = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floating} == {torch.float64}
    layer = next(model.moe_layers())
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(layer_out=out.dtype))
    combine = dispatch.weighted_sum
    monkeypatch.setattr(
        dispatch, "weighted_sum", lambda *a, **k: seen.setdefault("combine", combine(*a, **k))
    )
    engine = build_engine(model, engine=cfg.engine, trainer=cfg.trainer, mesh=mesh)
    inputs, targets = tokens(cfg)
    loss = lm_loss(model, inputs, targets) + model.moe_loss()
    engine.backward(loss, last_micro_batch=True)
    norm = engine.reduce_gradients()
    engine.step(norm, max_norm=1.0)
    assert loss.dtype == layer.stats.aux_loss.dtype == layer.stats.z_loss.dtype == torch.float64
    assert seen["layer_out"] == seen["combine"].dtype == torch.float64
    assert norm.dtype == global_grad_norm(model, mesh).dtype == torch.float64
    state = engine.checkpoint_state()
    moments = [t for key, t in state.items() if key.endswith((".exp_avg", ".exp_avg_sq"))]
    masters = [t for key, t in state.items() if key.startswith("model.")]
    assert moments and masters and {t.dtype for t in moments + masters} == {torch.float64}


def test_fp64_and_fp32_start_from_the_same_weights():
    """fp64 is a verification mode of the same model: the initial weights are the fp32 ones, widened."""
    models = [
        build_model(
            compose_config([*TINY, f"trainer.precision={p}"]), single_process_mesh(), torch.device("cpu")
        )
        for p in ("fp32", "fp64")
    ]
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a.double(), b), name


def sequence_loss_by_hand(router: Router, x_BSD: torch.Tensor) -> float:
    """DeepSeek-V3 sequence-wise balance loss: per sequence f_i = E/(K·S)·#{t: i in top-k(t)}, P_i = mean_t
    s'_{i,t} with s' the normalised scores; L = Σ_i f_i·P_i, averaged over the sequences. Plain Python."""
    E, K = router.num_experts, router.top_k
    total = 0.0
    for seq in x_BSD.double().tolist():
        S = len(seq)
        counts, probs = [0] * E, [0.0] * E
        for token in seq:
            scores = [sum(a * b for a, b in zip(token, w)) for w in router.weight.double().tolist()]
            scores = [1 / (1 + math.exp(-s)) for s in scores]
            for i in sorted(range(E), key=lambda i: -scores[i])[:K]:
                counts[i] += 1
            for i in range(E):
                probs[i] += scores[i] / sum(scores) / S
        total += sum(E / (K * S) * counts[i] * probs[i] for i in range(E))
    return total / len(x_BSD)


def test_sequence_aux_loss_is_deepseek_v3_formula():
    torch.manual_seed(0)
    router = Router(
        8, MoEConfig(num_experts=5, top_k=2, router="sigmoid", aux_loss_scope="sequence")
    ).double()
    x_BSD = torch.randn(3, 7, 8, dtype=torch.float64)
    routing = router(x_BSD.reshape(-1, 8), seq_len=7)
    assert routing.aux_loss.item() == pytest.approx(sequence_loss_by_hand(router, x_BSD), rel=1e-12)


@pytest.mark.parametrize("scope", ["sequence", "micro_step"])
def test_only_the_sequence_scope_is_independent_of_the_batch_split(scope):
    """Cutting 4 sequences into two micro-steps of 2: the mean of the two losses (and of their gradients)
    equals the whole batch's for ``sequence``; for ``micro_step`` it does not (counts of a micro-step)."""
    torch.manual_seed(0)
    router = Router(8, MoEConfig(num_experts=4, top_k=2, aux_loss_scope=scope, z_loss_coef=0.0)).double()
    x_BSD = torch.randn(4, 6, 8, dtype=torch.float64)

    def loss_and_grad(pieces):
        router.zero_grad()
        loss = sum(router(p.reshape(-1, 8), seq_len=6).aux_loss for p in pieces) / len(pieces)
        loss.backward()
        return loss.item(), router.weight.grad.clone()

    whole, whole_grad = loss_and_grad([x_BSD])
    split, split_grad = loss_and_grad(list(x_BSD.split(2)))
    if scope == "sequence":
        assert split == pytest.approx(whole, abs=1e-15)
        torch.testing.assert_close(split_grad, whole_grad, rtol=0, atol=1e-15)
    else:
        assert abs(split - whole) > 1e-6
