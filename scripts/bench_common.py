"""What both benchmarks record about the code they measured (scripts/ is on sys.path when they run)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_version() -> str:
    """The checkout's commit, with "+dirty" when moe_dist/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "moe_dist"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
