"""GPU constants: peak FLOP/s per dtype, memory size and bandwidth, NVLink and network bandwidth per GPU.

One table for everything that needs them (the planner's roofline; MFU in the training logs, through
``device_bf16_peak_flops``). Numbers are the vendors' dense (no sparsity) datasheet peaks:
- A100 SXM4 80GB: NVIDIA A100 Tensor Core GPU datasheet (bf16 312 TFLOP/s, fp32 19.5, tf32 156, fp64 tensor
  core 19.5; HBM2e 2,039 GB/s; NVLink 600 GB/s total = 300 GB/s per direction); network: DGX A100 has one
  200 Gb/s HDR InfiniBand port per GPU.
- H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet (bf16 1,979 TFLOP/s with sparsity = 989.4 dense, fp8
  1,979 dense, fp32 67, fp64 tensor core 67; HBM3 3.35 TB/s; NVLink 900 GB/s total = 450 per direction);
  network: DGX H100 has one 400 Gb/s ConnectX-7 port per GPU.
- H200 SXM 141GB: NVIDIA H200 datasheet (compute as H100; HBM3e 4.8 TB/s, 141 GB; NVLink 900 GB/s); network
  as DGX H200: 400 Gb/s per GPU.
- B200: NVIDIA DGX B200 datasheet (8 GPUs: 1,440 GB HBM3e at 64 TB/s in all, fifth-generation NVLink at
  1.8 TB/s per GPU = 900 GB/s per direction, 8 x 400 Gb/s ConnectX-7) and, per GPU dense, bf16 2,250 TFLOP/s,
  fp8 4,500, tf32 1,125, fp32 80 as tabulated by S. Bekman, "Machine Learning Engineering" (github.com/stas00/
  ml-engineering, compute/accelerator); fp64 is not sourced here: fp64 plans on b200 use the fp32 figure.

``achievable`` fractions are stated assumptions, not measurements: the matmul one is the Maximum Achievable
Matmul FLOPS (MAMF) a tuned bf16 GEMM reached in S. Bekman's measurements (A100 SXM 86.9%, H100 SXM 80.3%;
H200 and B200 not measured there: the H100 value is used); memory and link fractions are round assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: dict[
        str, float
    ]  # dense peak FLOP/s of matmuls by input dtype (fp32 = no TF32, torch's default)
    memory_bytes: float  # HBM capacity
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, per direction, to the other GPUs of its node
    network_bytes_per_s: float  # per GPU, per direction, to other nodes (one NIC per GPU, rail-optimised)
    achievable: dict[str, float] = field(default_factory=dict)  # fraction of each peak a tuned kernel reaches

    def matmul_flops(self, dtype: str) -> float:
        """Peak FLOP/s of a matmul with inputs of ``dtype`` ("bf16", "fp16", "fp32", "fp64", "fp8")."""
        return self.peak_flops.get(dtype, self.peak_flops["fp32"])


def _gpu(name, *, bf16, fp8, fp32, tf32, fp64, memory_gb, hbm_tbps, nvlink_gbps, network_gbitps, mamf):
    return GPU(
        name=name,
        peak_flops={
            "bf16": bf16 * TFLOPS,
            "fp16": bf16 * TFLOPS,
            "fp8": (fp8 or bf16) * TFLOPS,
            "fp32": fp32 * TFLOPS,
            "tf32": tf32 * TFLOPS,
            "fp64": fp64 * TFLOPS,
        },
        memory_bytes=memory_gb * GB,
        hbm_bytes_per_s=hbm_tbps * 1e12,
        nvlink_bytes_per_s=nvlink_gbps * GB,
        network_bytes_per_s=network_gbitps * 1e9 / 8,
        achievable={"matmul": mamf, "hbm": 0.9, "nvlink": 0.8, "network": 0.9},
    )


GPUS: dict[str, GPU] = {
    "a100": _gpu("NVIDIA A100 SXM4 80GB", bf16=312, fp8=None, fp32=19.5, tf32=156, fp64=19.5, memory_gb=80,
                 hbm_tbps=2.039, nvlink_gbps=300, network_gbitps=200, mamf=0.869),
    "h100": _gpu("NVIDIA H100 SXM5 80GB", bf16=989.4, fp8=1979, fp32=67, tf32=494.5, fp64=67, memory_gb=80,
                 hbm_tbps=3.35, nvlink_gbps=450, network_gbitps=400, mamf=0.803),
    "h200": _gpu("NVIDIA H200 SXM 141GB", bf16=989.4, fp8=1979, fp32=67, tf32=494.5, fp64=67, memory_gb=141,
                 hbm_tbps=4.8, nvlink_gbps=450, network_gbitps=400, mamf=0.803),
    "b200": _gpu("NVIDIA B200 180GB", bf16=2250, fp8=4500, fp32=80, tf32=1125, fp64=80, memory_gb=180,
                 hbm_tbps=8.0, nvlink_gbps=900, network_gbitps=400, mamf=0.803),
}  # fmt: skip


# What torch.cuda.get_device_name() reports → dense bf16 peak FLOP/s, first match first: the GPUs above and
# the PCIe / NVL boards of the same chips (H100 PCIe 756, H100 NVL and H200 NVL 835: their datasheets'
# "with sparsity" figures halved). MFU in the training logs reads this.
DEVICE_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835 * TFLOPS),
    ("H200", GPUS["h200"].peak_flops["bf16"]),
    ("H100 NVL", 835 * TFLOPS),
    ("H100 PCIe", 756 * TFLOPS),
    ("H100", GPUS["h100"].peak_flops["bf16"]),
    ("A100", GPUS["a100"].peak_flops["bf16"]),
    ("B200", GPUS["b200"].peak_flops["bf16"]),
)


def device_bf16_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU named ``device_name`` (None when not in DEVICE_BF16_PEAKS)."""
    return next((flops for key, flops in DEVICE_BF16_PEAKS if key in device_name), None)


@dataclass(frozen=True)
class Overheads:
    """Latencies the roofline adds (stated assumptions, not measurements)."""

    kernel_s: float = 3e-6  # the shortest a kernel takes on the GPU (launch to completion)
    host_per_op_s: float = 6e-6  # eager PyTorch host time to dispatch and launch one kernel
    host_sync_s: float = 20e-6  # a device-to-host round trip after the queue drains (copy, wake-up)
    collective_intra_s: float = 15e-6  # NCCL latency of a collective inside one node
    collective_inter_s: float = 30e-6  # NCCL latency of a collective across nodes


def gpu(name: str) -> GPU:
    """The constants of ``name`` (a key of ``GPUS``); ValueError naming ``plan.gpu`` otherwise."""
    if name not in GPUS:
        raise ValueError(f"plan.gpu={name!r}: unknown GPU; choose one of {sorted(GPUS)}")
    return GPUS[name]
