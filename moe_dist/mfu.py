"""Model FLOPs utilisation (MFU): the device peak a run is measured against.

MFU = model FLOP/s per rank / the device's peak FLOP/s. Model FLOPs come from the architecture alone
(``moe_dist.model.transformer.model_flops_per_token``), so recomputation or padding never counts as useful.
The peak is ``trainer.peak_tflops`` when set; else, on a known GPU, its dense bf16 tensor-core peak (from
moe_dist/hardware.py, the one table of GPU constants); on CPU, the rate of a 1024³ GEMM in the compute dtype
measured when the run starts.
"""

from __future__ import annotations

import time

import torch

from moe_dist.hardware import TFLOPS, device_bf16_peak_flops

GEMM_SIZE = 1024


def measure_gemm_tflops(device: torch.device, dtype: torch.dtype, *, repeats: int = 5) -> float:
    """Best-of-``repeats`` TFLOP/s of one GEMM_SIZE³ matrix product on ``device`` (current threads)."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device).to(dtype)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * GEMM_SIZE**3 / best / 1e12


def device_peak_tflops(
    device: torch.device, dtype: torch.dtype, *, configured: float | None
) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where the figure comes from); (None, why) when there is none."""
    if configured is not None:
        return configured, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype != torch.bfloat16:
            return None, f"no built-in {dtype} peak for {name}: set trainer.peak_tflops"
        flops = device_bf16_peak_flops(name)
        if flops is None:
            return None, f"unknown GPU {name!r}: set trainer.peak_tflops"
        return flops / TFLOPS, f"{name} dense bf16 data-sheet peak (moe_dist/hardware.py)"
    return measure_gemm_tflops(device, dtype), f"measured {GEMM_SIZE}³ {dtype} GEMM on {device.type}"
