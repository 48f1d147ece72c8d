"""Exports a moe_dist checkpoint (saved at any world size and EP) as a Hugging Face model directory.

    python -m moe_dist.export runs/demo/checkpoints/step_400 hf_out [--dtype bfloat16]
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf_out')"

The architecture is the transformers one that computes the same function (see moe_dist/hf.py); a model
with no exact counterpart is refused with a message naming the feature, before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe_dist.checkpoint import read_meta, resolve_checkpoint
from moe_dist.hf import ARCHITECTURES, export_model, hf_model_type
from moe_dist.model.build import load_model, model_config_from_meta
from moe_dist.parallel.mesh import single_process_mesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[str, Path]:
    """Loads the global experts of ``checkpoint`` in this one process and writes ``out_dir``.

    Returns (model_type, checkpoint path).
    """
    path = resolve_checkpoint(checkpoint)
    hf_model_type(model_config_from_meta(read_meta(path)))
    model, _ = load_model(path, mesh=single_process_mesh(), device=torch.device("cpu"))
    return export_model(model, out_dir, dtype=dtype), path


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
