"""The CUDA-only paths: grouped_mm over rows from several source ranks, pinned non-blocking copies, bf16
autocast. Skipped on machines without a GPU (this project's CI machines have none)."""

from __future__ import annotations

import pytest
import torch

from moe_dist.moe.dispatch import ExpertRows
from moe_dist.moe.experts import GroupedExperts
from moe_dist.transfer import int_tensor, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
CUDA = torch.device("cuda")


def test_pinned_copies_arrive():
    assert int_tensor([3, 1, 4], CUDA).tolist() == [3, 1, 4]
    host = torch.arange(12).view(3, 4)
    assert torch.equal(to_device(host, CUDA).cpu(), host)


@pytest.mark.parametrize("counts_PL", [[[3, 0, 2], [1, 4, 0]], [[0, 0, 0], [2, 5, 1]]])
def test_grouped_mm_over_source_segments_matches_the_loop(counts_PL):
    torch.manual_seed(0)
    L, D, F = 3, 16, 16
    rows = sum(map(sum, counts_PL))
    x = torch.randn(rows, D, device=CUDA)
    outputs = {}
    for mode in ("on", "off"):
        experts = GroupedExperts(L, D, F, grouped_mm=mode).to(CUDA)
        torch.manual_seed(1)
        with torch.no_grad():
            experts.w_gate_up.normal_(0, 0.3)
            experts.w_down.normal_(0, 0.3)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = experts(xi, ExpertRows([list(r) for r in counts_PL]))
        y.float().sum().backward()
        outputs[mode] = (y.float(), xi.grad, experts.w_gate_up.grad, experts.w_down.grad)
    for a, b in zip(outputs["on"], outputs["off"]):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
