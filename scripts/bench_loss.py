"""Peak memory and time of the LM-head loss (forward + backward) at a large vocabulary: the plain cross-entropy
(full fp32 logits) against moe_dist's chunked one, over a range of token counts. Prints a table and JSON.

    python scripts/bench_loss.py [--vocab 151936] [--dim 256] [--tokens 512 1024 2048 4096] [--plain-up-to 2048]

Peak memory is what the allocator held above the inputs during the step (CUDA: max_memory_allocated; CPU: the
profiler's allocation events), so it counts the logits, their gradient and every temporary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import Runtime, machine_info, peak_step_bytes

from moe_dist.model.loss import chunk_tokens_for, linear_cross_entropy
from moe_dist.parallel.mesh import single_process_mesh


def step(h, w, targets, *, chunked: bool):
    h.grad = w.grad = None
    if chunked:
        loss = linear_cross_entropy(h, w, targets)[0] / len(targets)
    else:
        loss = F.cross_entropy(F.linear(h, w).float(), targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936, help="Qwen3's vocabulary by default")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument(
        "--plain-up-to", type=int, default=2048, help="largest token count for the plain loss"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rt = Runtime(device=device, rank=0, world=1, mesh=single_process_mesh())
    loadavg = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.vocab, args.dim, generator=gen) * 0.02).to(device).requires_grad_()
    rows = []
    print(
        f"vocab {args.vocab:,}, dim {args.dim}, chunk {chunk_tokens_for(args.vocab, None)} tokens, {device}"
    )
    print("tokens | loss    | peak MiB | ms     | peak MiB plain | ms plain | |Δloss|  | max |Δgrad h|")
    for T in args.tokens:
        h = torch.randn(T, args.dim, generator=gen).to(device).requires_grad_()
        targets = torch.randint(args.vocab, (T,), generator=gen).to(device)
        row = {"tokens": T}
        results = {}
        for name, chunked in (("chunked", True), ("plain", False)):
            if not chunked and args.plain_up_to < T:
                continue
            step(h, w, targets, chunked=chunked)  # warm-up
            peak, _ = peak_step_bytes(rt, lambda c=chunked, h=h, t=targets: step(h, w, t, chunked=c))
            start = time.perf_counter()
            results[name] = step(h, w, targets, chunked=chunked)
            rt.sync()
            row[f"{name}_ms"] = 1000 * (time.perf_counter() - start)
            row[f"{name}_peak_bytes"] = peak
        row["loss"] = results["chunked"][0].item()
        if "plain" in results:
            row["abs_loss_diff"] = abs(results["chunked"][0] - results["plain"][0]).item()
            row["max_abs_grad_h_diff"] = (results["chunked"][1] - results["plain"][1]).abs().max().item()
        rows.append(row)
        plain = (
            f"{row['plain_peak_bytes'] / 2**20:>14,.0f} | {row['plain_ms']:>8.0f} | {row['abs_loss_diff']:.1e} | "
            f"{row['max_abs_grad_h_diff']:.1e}"
            if "plain" in results
            else f"{'-':>14} | {'-':>8} | {'-':>7} | -"
        )
        print(
            f"{T:>6} | {row['loss']:.4f} | {row['chunked_peak_bytes'] / 2**20:>8,.0f} | {row['chunked_ms']:>6.0f} | "
            + plain
        )
    out = {"rows": rows, "vocab": args.vocab, "dim": args.dim, "machine": _machine(rt, loadavg)}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def _machine(rt: Runtime, loadavg: float) -> dict:
    import torch.distributed as dist

    if not dist.is_initialized():
        return {"device": str(rt.device), "torch": torch.__version__, "loadavg_start": loadavg,
                "loadavg_end": os.getloadavg()[0], "threads": torch.get_num_threads()}  # fmt: skip
    return machine_info(rt, loadavg_start=loadavg)


if __name__ == "__main__":
    main()
