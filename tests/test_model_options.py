"""Model options for released architectures and real data: the chunked cross-entropy (equal to the plain loss,
memory bounded) and document masking (equal to running every document alone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import moe_dist.model.transformer as transformer
from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.model.loss import IGNORE_INDEX, linear_cross_entropy
from moe_dist.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_loss(h, w, targets):
    logits = F.linear(h, w)
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum"
    )


def loss_and_grads(fn, h, w, targets):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_chunked_cross_entropy_equals_the_plain_loss(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    T, D, V = 300, 24, 1000
    h = torch.randn(T, D, generator=gen, dtype=dtype)
    w = torch.randn(V, D, generator=gen, dtype=dtype) * 0.3
    targets = torch.randint(V, (T,), generator=gen)
    targets[::7] = IGNORE_INDEX  # masked (prompt) tokens carry no loss and no gradient
    reference = loss_and_grads(plain_loss, h, w, targets)
    for chunk in (None, 64, 7, T):  # auto, uneven last chunk, tiny chunks, one chunk
        result = loss_and_grads(
            lambda *a, c=chunk: linear_cross_entropy(*a, chunk_tokens=c)[0], h, w, targets
        )
        for ours, ref in zip(result, reference):
            assert (ours - ref).abs().max() <= tol * max(1.0, ref.abs().max().item()), chunk
    assert linear_cross_entropy(h, w, targets)[1].item() == (targets != IGNORE_INDEX).sum().item()


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_plain_loss():
    """The matmuls run in bf16 as F.linear under autocast does; the softmax stays fp32."""
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=gen), torch.randn(500, 32, generator=gen) * 0.2
    targets = torch.randint(500, (64,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = loss_and_grads(plain_loss, h, w, targets)
        result = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=16)[0], h, w, targets)
    assert abs(result[0] - reference[0]) < 1e-3 * reference[0]
    for ours, ref in zip(result[1:], reference[1:]):
        assert (ours - ref).abs().max() < 2e-2 * ref.abs().max()


class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_cross_entropy_never_materialises_the_full_logits():
    T, D, V, chunk = 2048, 16, 6000, 64
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(T, D, generator=gen, requires_grad=True)
    w = torch.randn(V, D, generator=gen, requires_grad=True)
    targets = torch.randint(V, (T,), generator=gen)
    for chunk_tokens, bound in ((chunk, chunk * V), (0, T * V)):
        with LargestTensor() as probe:
            linear_cross_entropy(h, w, targets, chunk_tokens=chunk_tokens)[0].backward()
        if chunk_tokens:  # the largest buffers: one chunk of logits, the head weight and its gradient
            assert probe.largest == max(bound, V * D), probe.largest
        else:  # the plain loss (the check above could not fail if this one did not see [T, V])
            assert probe.largest == bound


def model(moe: bool, *, dtype=torch.float32, **options) -> Transformer:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, seq_len=24, ffn_hidden=48, vocab_size=64, **options)
    cfg.moe = MoEConfig(num_experts=4 if moe else 0, top_k=2, expert_hidden=32)
    m = Transformer(cfg)
    m.init_weights(3)
    return m.to(dtype).eval()


PACKED = [5, 11, 1, 7]  # document lengths packed into one row of 24 tokens


def packed_row(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(64, (1, sum(PACKED)), generator=torch.Generator().manual_seed(seed))
    doc_ids = torch.repeat_interleave(torch.arange(len(PACKED)), torch.tensor(PACKED)).unsqueeze(0)
    return tokens, doc_ids


@pytest.mark.parametrize(
    ("moe", "dtype", "options", "tol"),
    [
        (False, torch.float64, {}, 1e-12),
        (False, torch.float64, {"n_kv_heads": 2, "head_dim": 12, "qk_norm": "head"}, 1e-12),
        (True, torch.float32, {"n_kv_heads": 1, "qk_norm": "full"}, 2e-5),
    ],
)
def test_document_mask_equals_running_each_document_alone(moe, dtype, options, tol):
    m = model(moe, dtype=dtype, **options)
    tokens, doc_ids = packed_row()
    with torch.no_grad():
        packed = m(tokens, doc_ids_BS=doc_ids)[0]
        alone = torch.cat([m(doc.unsqueeze(0))[0] for doc in tokens[0].split(PACKED)])
        assert (packed - alone).abs().max() < tol
        # Without the mask the later documents see the earlier ones: the check above can fail.
        assert (m(tokens)[0] - alone).abs().max() > 1e-3


def test_document_mask_gradients_equal_the_separate_documents_in_fp64():
    tokens, doc_ids = packed_row(seed=1)
    targets = torch.randint(64, tokens.shape, generator=torch.Generator().manual_seed(2))
    packed_model, alone_model = model(False, dtype=torch.float64), model(False, dtype=torch.float64)
    packed_model(tokens, targets_BS=targets, doc_ids_BS=doc_ids).backward()
    total = sum(
        alone_model(x.unsqueeze(0), targets_BS=y.unsqueeze(0)) * len(x)
        for x, y in zip(tokens[0].split(PACKED), targets[0].split(PACKED))
    )
    (total / tokens.numel()).backward()  # the packed loss is the token mean over all documents
    for (name, a), b in zip(packed_model.named_parameters(), alone_model.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-12, name


def test_flex_attention_path_equals_the_dense_mask(monkeypatch):
    """The CUDA path (flex_attention with a block mask), run here uncompiled on CPU."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setitem(transformer._FLEX, "fn", flex.flex_attention)
    monkeypatch.setitem(transformer._FLEX, "block_mask", flex.create_block_mask)
    _, doc_ids = packed_row(seed=3)
    m = model(False, n_kv_heads=2)
    q = torch.randn(1, 4, 24, 8, generator=torch.Generator().manual_seed(4))
    k, v = q[:, :2].flip(2), q[:, 2:] * 2
    dense = transformer.DocumentMask(doc_ids, m.rope_cos, m.rope_sin, use_flex=False)
    blocks = transformer.DocumentMask(doc_ids, m.rope_cos, m.rope_sin, use_flex=True)
    with pytest.warns(UserWarning, match="without torch.compile"):
        out = blocks.attend(q, k, v, enable_gqa=True)
    assert (out - dense.attend(q, k, v, enable_gqa=True)).abs().max() < 1e-6


def test_document_positions_restart_at_every_document():
    _, doc_ids = packed_row()
    expected = torch.cat([torch.arange(n) for n in PACKED])
    assert torch.equal(transformer.document_positions(doc_ids)[0], expected)


def test_tied_embeddings_share_one_matrix():
    m = model(True, tie_embeddings=True)
    assert m.output is None and m.head_weight is m.tok_embeddings.weight
    assert "output.weight" not in m.state_dict()
    untied = model(True)
    n_tied, n_untied = (sum(p.numel() for p in x.parameters()) for x in (m, untied))
    assert n_untied - n_tied == 64 * 32


@pytest.mark.parametrize(
    ("options", "moe", "total", "active"),
    [
        (  # Qwen3-30B-A3B: "30.5B in total and 3.3B activated"; q_proj 4096 x 2048 (32 heads of 128)
            {"vocab_size": 151_936, "dim": 2048, "n_layers": 48, "n_heads": 32, "n_kv_heads": 4, "head_dim": 128,
             "qk_norm": "head"},
            {"num_experts": 128, "top_k": 8, "expert_hidden": 768},
            30.5e9, 3.3e9,
        ),
        (  # OLMoE-1B-7B: 6.9B total, 1.3B active
            {"vocab_size": 50_304, "dim": 2048, "n_layers": 16, "n_heads": 16, "qk_norm": "full"},
            {"num_experts": 64, "top_k": 8, "expert_hidden": 1024, "norm_topk": False},
            6.9e9, 1.3e9,
        ),
        (  # Mixtral-8x7B: 46.7B total, 12.9B active
            {"vocab_size": 32_000, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8},
            {"num_experts": 8, "top_k": 2, "expert_hidden": 14_336},
            46.7e9, 12.9e9,
        ),
    ],
)  # fmt: skip
def test_released_model_configs_have_the_published_sizes(options, moe, total, active):
    from moe_dist.model.transformer import count_parameters

    with torch.device("meta"):
        m = Transformer(ModelConfig(**options, moe=MoEConfig(**moe)))
    counts = count_parameters(m)
    # The published figures are rounded: within 2% (a missing or extra projection would be far more).
    assert abs(counts["total"] / total - 1) < 0.02 and abs(counts["active"] / active - 1) < 0.02
