"""Plots a moe_dist run from its metrics.jsonl: loss curves and per-layer expert-load heatmaps.

    python scripts/plot_run.py runs/moe_dist_123456 [--out DIR]

Writes ``loss.png`` (train loss, and val loss where the run evaluated) and ``expert_load.png`` (one
heatmap per MoE layer: step x expert, colour = fraction of the layer's token copies routed to that
expert; a balanced layer sits at 1/num_experts everywhere), then prints their paths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from moe_dist.metrics import METRICS_FILE, read_metrics


def latest_per_step(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Records holding ``key``, one per step, sorted by step. A resumed run appends to metrics.jsonl
    and may repeat steps after its checkpoint: the later record (the resumed run's) wins."""
    by_step = {r["step"]: r for r in records if key in r}
    return [by_step[s] for s in sorted(by_step)]


def step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each logged step (logging need not be evenly spaced: the last step always logs)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])


def plot_loss(train: list[dict[str, Any]], val: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(train: list[dict[str, Any]], path: Path, title: str) -> None:
    steps = np.array([r["step"] for r in train], dtype=float)
    load_SLE = np.array([r["expert_load"] for r in train], dtype=float)  # steps x MoE layers x experts
    _, num_layers, num_experts = load_SLE.shape
    x_edges = step_edges(steps)
    y_edges = np.arange(num_experts + 1) - 0.5
    vmax = max(float(np.nanmax(load_SLE)), 1.0 / num_experts)
    fig, axes = plt.subplots(
        num_layers,
        1,
        figsize=(8, 0.6 + num_layers * (0.6 + 0.12 * num_experts)),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for layer, ax in enumerate(axes[:, 0]):
        mesh = ax.pcolormesh(x_edges, y_edges, load_SLE[:, layer, :].T, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        if num_experts <= 16:
            ax.set_yticks(range(num_experts))
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title(f"{title}: expert load (uniform = 1/{num_experts} = {1 / num_experts:.3f})")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="fraction of token copies")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plot_run.py",
        description=(
            f"Plot a moe_dist run from <run_dir>/{METRICS_FILE}: loss.png (train and val loss vs step) "
            "and expert_load.png (per MoE layer, load fraction of each expert vs step)."
        ),
    )
    parser.add_argument("run_dir", type=Path, help=f"run directory (trainer.out_dir) holding {METRICS_FILE}")
    parser.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: run_dir)")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    """Writes the plots; returns their paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.run_dir / METRICS_FILE).is_file():
        parser.error(f"no {METRICS_FILE} in {args.run_dir}")
    records = read_metrics(args.run_dir)
    train = latest_per_step(records, "loss")
    val = latest_per_step(records, "val_loss")
    if not train and not val:
        parser.error(f"{args.run_dir / METRICS_FILE} holds no training or eval records")
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    title = args.run_dir.resolve().name

    paths = [out / "loss.png"]
    plot_loss(train, val, paths[0], title)
    with_load = [r for r in train if r.get("expert_load")]
    if with_load:
        paths.append(out / "expert_load.png")
        plot_expert_load(with_load, paths[1], title)
    else:
        print("no expert_load in the records (a dense model?): skipped expert_load.png", file=sys.stderr)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
