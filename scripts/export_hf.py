"""Exports a moe_dist checkpoint as a Hugging Face model directory: ``python -m moe_dist.export``, runnable
from a checkout without installing.

    python scripts/export_hf.py runs/demo/checkpoints/step_400 hf_out [--dtype bfloat16]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.export import main

if __name__ == "__main__":
    main()
