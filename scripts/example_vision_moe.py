"""moe_dist.MoELayer as a drop-in layer: an MoE image classifier on scikit-learn's digits, trained with EP.

    torchrun --nproc_per_node 2 scripts/example_vision_moe.py      # experts sharded over 2 CPU ranks (EP=2)
    python scripts/example_vision_moe.py --steps 150                # one process works too

Each 8x8 digit becomes 4 tokens (its 4x4 quadrants, 16 pixels each, plus a learned position embedding);
two pre-norm residual MoE blocks transform every token, and a linear head reads the 4 tokens. The same
model is trained twice, with a top-k softmax router and with the dense soft mixture (every expert,
softmax(logits / temperature)), and a table compares them. The digits (1,797 images) ship with
scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import moe_dist
from moe_dist import MoEConfig, MoELayer

NUM_CLASSES = 10
NUM_TOKENS, PATCH = 4, 16  # 4 quadrants of 4x4 pixels


class MoEDigitClassifier(nn.Module):
    """Images [B, 64] → quadrant tokens [B, 4, D] → MoE blocks → logits [B, 10]."""

    def __init__(self, moe: MoEConfig, *, dim: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(PATCH, dim)
        self.pos = nn.Parameter(torch.randn(NUM_TOKENS, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.moes = nn.ModuleList(MoELayer(dim, moe) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(NUM_TOKENS * dim), nn.Linear(NUM_TOKENS * dim, NUM_CLASSES))

    def forward(self, images_B64: torch.Tensor) -> torch.Tensor:
        B = images_B64.shape[0]
        # [B, 8, 8] → [B, 2, 4, 2, 4] → quadrants [B, 4, 16]
        patches = images_B64.view(B, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(B, NUM_TOKENS, PATCH)
        h = self.embed(patches) + self.pos
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.head(h.reshape(B, -1))

    def aux_loss(self) -> torch.Tensor:
        return sum(m.stats.weighted_loss(m.cfg) for m in self.moes)


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); 20% held out, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    num_test = len(labels) // 5
    test, train = order[:num_test], order[num_test:]
    return images[train], labels[train], images[test], labels[test]


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_and_test(moe: MoEConfig, args: argparse.Namespace, data, mesh: moe_dist.Mesh) -> dict:
    """Every rank builds the same model (same seed), keeps its expert shard, and trains on its batch slice."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(args.seed)
    model = MoEDigitClassifier(moe, dim=args.dim, depth=args.depth)
    moe_dist.parallelize_moe(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    local = args.batch_size // mesh.world_size
    start, loss_sum, counts_E = time.perf_counter(), 0.0, torch.zeros(moe.num_experts)
    for step in range(args.steps):
        # The global batch is the same on every rank; each rank takes its own slice of it.
        batch = torch.randint(len(train_y), (args.batch_size,), generator=torch.Generator().manual_seed(step))
        batch = batch[mesh.rank * local : (mesh.rank + 1) * local]
        for group in optimizer.param_groups:  # 20 warm-up steps, then cosine to 0
            group["lr"] = (
                args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            )
        ce = F.cross_entropy(model(train_x[batch]), train_y[batch])
        (ce + model.aux_loss()).backward()
        moe_dist.sync_gradients(model, mesh)  # expert grads over EDP, dense grads over the world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.steps - 20:  # the last 20 steps: mean loss and routed-token counts
            loss_sum += ce.item()
            counts_E += sum(m.stats.counts_E.float() for m in model.moes)
    train_s = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        mine = slice(mesh.rank, None, mesh.world_size)  # every rank runs one forward (the MoE is collective)
        correct = (model(test_x[mine]).argmax(-1) == test_y[mine]).sum().item()
    loss_sum, correct, *counts = all_reduce_sum([loss_sum, correct, *counts_E.tolist()])
    counts_E = torch.tensor(counts)
    return {
        "router": moe.router,
        "experts_per_token": moe.num_experts if moe.router == "soft" else moe.top_k,
        "test_accuracy": correct / len(test_y),
        "train_loss": loss_sum / (min(20, args.steps) * mesh.world_size),
        "max_expert_share": (counts_E.max() / counts_E.sum()).item(),
        "train_s": train_s,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per router")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0, help="soft mixture temperature")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--expert-hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--ep", type=int, default=None, help="expert-parallel degree (default: min(2, world))"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if args.batch_size % world:
        raise ValueError(f"--batch-size={args.batch_size}: must be divisible by the world size {world}")
    ep = args.ep or min(2, world)
    mesh = moe_dist.build_mesh(ep=ep, num_experts=args.experts)  # the one call that sets up EP x DP
    data = load_digits_split(args.seed)
    common = {"num_experts": args.experts, "expert_hidden": args.expert_hidden, "z_loss_coef": 0.0}
    configs = [
        MoEConfig(**common, router="softmax", top_k=args.top_k, aux_loss_coef=0.01),
        MoEConfig(**common, router="soft", temperature=args.temperature, aux_loss_coef=0.0),
    ]
    results = [train_and_test(moe, args, data, mesh) for moe in configs]
    if mesh.rank == 0:
        print(
            f"digits: {len(data[1])} train / {len(data[3])} test images | world={mesh.world_size} ep={mesh.ep} | "
            f"{args.experts} experts, {args.steps} steps, batch {args.batch_size}"
        )
        print(
            f"{'router':<24} {'experts/token':>13} {'test acc':>9} {'train loss':>10} {'max load':>9} {'time':>7}"
        )
        for r in results:
            name = (
                f"top-{args.top_k} softmax" if r["router"] == "softmax" else f"soft (T={args.temperature:g})"
            )
            print(
                f"{name:<24} {r['experts_per_token']:>13} {r['test_accuracy']:>9.3f} {r['train_loss']:>10.4f} "
                f"{r['max_expert_share']:>9.3f} {r['train_s']:>6.1f}s"
            )
    return results


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
