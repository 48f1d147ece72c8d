"""Run outputs on rank 0: metrics.jsonl (one JSON object per line), console lines, and wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes records on rank 0 only; every other rank gets a logger that does nothing."""

    def __init__(self, out_dir: Path, *, enabled: bool, wandb_cfg=None, run_config: dict | None = None):
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run; append: a resume continues it)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name,
                mode=wandb_cfg.mode,
                dir=str(out_dir),
                config=run_config,
                resume="allow",
                id=_wandb_run_id(out_dir),
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if record.get("peak_memory_mib"):  # one number per rank: wandb gets the largest
                flat["peak_memory_mib_max"] = max(record["peak_memory_mib"])
            self.wandb.log(flat, step=record["step"])

    def log_expert_heatmap(self, step: int, expert_load: list[list[float]]) -> None:
        """Layer x expert load heatmap to wandb (the jsonl already holds the numbers)."""
        if self.wandb is None or not expert_load:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import wandb

        fig, ax = plt.subplots(figsize=(6, 0.4 * len(expert_load) + 1.5))
        im = ax.imshow(expert_load, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load, step {step}")
        fig.colorbar(im, ax=ax)
        self.wandb.log({"expert_load_heatmap": wandb.Image(fig)}, step=step)
        plt.close(fig)

    def console(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run_id(out_dir: Path) -> str:
    """Stable per run directory, so a resumed run continues the same wandb run."""
    id_file = out_dir / "wandb_run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    run_id = os.urandom(6).hex()
    id_file.write_text(run_id)
    return run_id


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    with open(Path(run_dir) / METRICS_FILE) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(out_dir: Path, *, after_step: int) -> None:
    """Drops records of steps > after_step (a resumed run redoes them), atomically."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return
    records = read_metrics(out_dir)
    kept = [r for r in records if r.get("step", 0) <= after_step]
    if len(kept) == len(records):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
