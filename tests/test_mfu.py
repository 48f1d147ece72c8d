"""MFU: model FLOPs per token from the architecture, and the device peak it is measured against."""

from __future__ import annotations

import pytest
import torch

from moe_dist import mfu
from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.model.transformer import Transformer, model_flops_per_token


def test_model_flops_per_token_by_hand():
    cfg = ModelConfig(
        vocab_size=256,
        dim=32,
        n_layers=2,
        n_heads=2,
        seq_len=16,
        ffn_hidden=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, every_n_layers=2),
    )
    model = Transformer(cfg)
    D, V = 32, 256
    attention = 4 * D * D + 2 * D  # q, k, v, o and the two norms of a block
    dense_block = attention + 3 * D * 64
    moe_block = attention + 4 * D + 2 * (D * 2 * 8 + 8 * D)  # router, then top_k = 2 of the experts
    active = dense_block + moe_block + D + V * D  # final norm, output head (the embedding table excluded)
    assert model_flops_per_token(model) == 6 * active + 6 * 2 * D * 16


def test_model_flops_per_token_with_gqa_head_dim_and_tied_embeddings():
    """Grouped K/V heads narrow k and v, not the attention products (they run at the query width
    n_heads·head_dim); a tied embedding is still the head's matmul, so it counts once."""
    cfg = ModelConfig(
        vocab_size=256,
        dim=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        head_dim=12,
        qk_norm="head",
        tie_embeddings=True,
        seq_len=16,
        ffn_hidden=64,
        moe=MoEConfig(num_experts=0),
    )
    model = Transformer(cfg)
    D, V, q_dim, kv_dim = 32, 256, 4 * 12, 2 * 12
    attention = 2 * D * q_dim + 2 * D * kv_dim + 2 * 12 + 2 * D  # q, o, k, v, q/k norms, block norms
    active = attention + 3 * D * 64 + D + V * D  # dense FFN, final norm, the tied head
    assert model_flops_per_token(model) == 6 * active + 6 * 1 * q_dim * 16


def test_peak_from_config_gpu_table_or_measured(monkeypatch):
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert mfu.device_peak_tflops(cuda, torch.bfloat16, configured=123.0) == (123.0, "trainer.peak_tflops")
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert mfu.device_peak_tflops(cuda, torch.bfloat16, configured=None)[0] == peak, name
    assert mfu.device_peak_tflops(cuda, torch.float32, configured=None)[0] is None  # no built-in fp32 peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    value, why = mfu.device_peak_tflops(cuda, torch.bfloat16, configured=None)
    assert value is None and "trainer.peak_tflops" in why
    value, why = mfu.device_peak_tflops(torch.device("cpu"), torch.float32, configured=None)
    assert 1e-3 < value < 100 and "measured" in why  # a CPU core does 0.01 to a few TFLOP/s


def test_peak_tflops_must_be_positive():
    from moe_dist.config import Config, validate

    cfg = Config()
    cfg.trainer.peak_tflops = 0.0
    with pytest.raises(ValueError, match=r"trainer\.peak_tflops=0\.0"):
        validate(cfg, world_size=1)
