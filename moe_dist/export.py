"""Exports a moe_dist checkpoint (saved at any world size, EP and engine) as a Hugging Face model directory,
streaming: one transformer layer at a time, read straight from the checkpoint's files into its own
safetensors file, with ``model.safetensors.index.json`` mapping every tensor to its file. No model is built:
peak memory is about one layer (its global experts) twice, whatever the model's size.

    python -m moe_dist.export runs/demo/checkpoints/step_400 hf_out [--dtype bfloat16]
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf_out')"

The architecture is the transformers one that computes the same function (see moe_dist/hf.py); a model
with no exact counterpart is refused with a message naming the feature, before anything is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_dist.checkpoint import (
    SafeFileSystemReader,
    read_meta,
    read_tensors,
    resolve_checkpoint,
    saved_tensors,
)
from moe_dist.hf import ARCHITECTURES, WEIGHTS_INDEX, _check_exportable, hf_config, hf_state_dict
from moe_dist.model.build import model_config_from_meta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KEEP_FP32 = ("e_score_correction_bias",)  # Hugging Face tensors that stay fp32 whatever the export dtype


class _OneGroupState(Mapping):
    """moe_dist's global state dict as the Hugging Face mapping reads it: the tensors of one group (a layer,
    or everything outside the layers) real, read from the checkpoint; every other one a meta tensor of the
    right shape, which costs nothing, so the mapping can run over the whole model for each group."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], real: dict[str, torch.Tensor]):
        self.shapes, self.real = shapes, real

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.real:
            return self.real[key]
        shape, dtype = self.shapes[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _group_of(name: str) -> str:
    """``layers.<i>`` for a tensor of transformer layer i (moe_dist or Hugging Face name), else ``rest``."""
    parts = name.split(".")
    for at in range(len(parts) - 1):
        if parts[at] == "layers" and parts[at + 1].isdigit():
            return f"layers.{parts[at + 1]}"
    return "rest"


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[str, Path]:
    """Writes ``out_dir`` from ``checkpoint`` one group at a time (every layer, then the embeddings, final norm
    and head); returns (model_type, checkpoint path)."""
    path = resolve_checkpoint(checkpoint)
    cfg = model_config_from_meta(read_meta(path))
    model_type = _check_exportable(cfg)
    reader = SafeFileSystemReader(str(path))
    shapes = {
        name.removeprefix("model."): shape_dtype
        for name, shape_dtype in saved_tensors(reader).items()
        if name.startswith("model.")
    }
    groups = [f"layers.{i}" for i in range(cfg.n_layers)] + ["rest"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for number, group in enumerate(groups, start=1):
        names = [name for name in shapes if _group_of(name) == group]
        real = read_tensors(reader, [f"model.{name}" for name in names])
        real = {name.removeprefix("model."): t for name, t in real.items()}
        tensors = {
            hf: (t if hf.endswith(KEEP_FP32) else t.to(dtype)).contiguous()
            for hf, t in hf_state_dict(cfg, _OneGroupState(shapes, real), model_type).items()
            if _group_of(hf) == group
        }
        assert all(t.device.type == "cpu" for t in tensors.values()), f"{group} depends on another group"
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        del real, tensors
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, model_type, dtype=dtype), indent=2) + "\n")
    (out / "moe_dist.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}, indent=2) + "\n")
    mode = (out / "config.json").stat().st_mode  # save_file makes its files owner-only
    for file in set(weight_map.values()):
        os.chmod(out / file, mode)
    return model_type, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_dist.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory (.../checkpoints/step_N) or run directory")
    parser.add_argument("out_dir", help="Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        model_type, path = export_checkpoint(args.checkpoint, args.out_dir, dtype=DTYPES[args.dtype])
    except ValueError as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {path} as {ARCHITECTURES[model_type]} ({args.dtype}) to {args.out_dir}")


if __name__ == "__main__":
    main()
