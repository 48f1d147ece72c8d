"""scripts/plot_run.py on synthetic metrics.jsonl files."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "plot_run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot_run():
    spec = importlib.util.spec_from_file_location("plot_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_metrics(
    run_dir: Path, *, num_steps: int, num_layers: int, num_experts: int, eval_every: int
) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, num_steps + 1):
        load = rng.dirichlet(np.ones(num_experts), size=num_layers).tolist() if num_experts else []
        loss = 5.5 * math.exp(-step / 20)
        lines.append({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "expert_load": load})
        if eval_every and step % eval_every == 0:
            lines.append({"step": step, "val_loss": loss + 0.1})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_loss_and_expert_load(plot_run, tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, num_steps=30, num_layers=3, num_experts=8, eval_every=10)
    paths = plot_run.main([str(run), "--out", str(tmp_path / "plots")])
    assert [p.name for p in paths] == ["loss.png", "expert_load.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.stat().st_size > 10_000
    loss_w, loss_h = png_size(paths[0])
    _, load_h = png_size(paths[1])
    assert loss_w > 500 and loss_h > 300
    assert load_h > loss_h  # three stacked heatmaps


def test_no_eval_records_and_dense_model(plot_run, tmp_path, capsys):
    run = tmp_path / "dense"
    write_metrics(run, num_steps=5, num_layers=0, num_experts=0, eval_every=0)
    paths = plot_run.main([str(run)])
    assert paths == [run / "loss.png"]  # next to metrics.jsonl; no load to plot
    assert png_size(paths[0])[0] > 500 and paths[0].stat().st_size > 10_000
    assert "skipped expert_load.png" in capsys.readouterr().err


def test_one_step_run(plot_run, tmp_path):
    run = tmp_path / "short"
    write_metrics(run, num_steps=1, num_layers=1, num_experts=4, eval_every=0)
    paths = plot_run.main([str(run)])
    assert [png_size(p)[0] > 500 for p in paths] == [True, True]


def test_resumed_run_keeps_the_later_record_per_step(plot_run):
    records = [
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.0},
        {"step": 2, "val_loss": 4.5},
        {"step": 2, "loss": 3.9},  # a resume from the step-1 checkpoint repeats step 2
        {"step": 3, "loss": 3.5},
    ]
    assert [r["loss"] for r in plot_run.latest_per_step(records, "loss")] == [5.0, 3.9, 3.5]
    assert [r["step"] for r in plot_run.latest_per_step(records, "val_loss")] == [2]


def test_step_edges(plot_run):
    np.testing.assert_allclose(plot_run.step_edges(np.array([10.0, 20.0, 25.0])), [5, 15, 22.5, 27.5])
    np.testing.assert_allclose(plot_run.step_edges(np.array([7.0])), [6.5, 7.5])


def test_missing_metrics_is_a_usage_error(plot_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot_run.main([str(tmp_path)])
    assert exc.value.code == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
