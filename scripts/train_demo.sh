#!/usr/bin/env bash
# The main job: installs what is missing, then trains the default small MoE on 2 CPU ranks with EP=2 on the
# built-in corpus (this Python's standard-library sources), checkpoints, and plots the run.
# Extra arguments are Hydra overrides, e.g. `bash scripts/train_demo.sh trainer.max_steps=400`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
# glibc hands every buffer >= 32 MiB straight from the OS, so each step page-faults its MoE buffers afresh;
# keeping them in the heap made the CPU MoE layer 25-30% faster (docs/PERFORMANCE.md).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
export MOE_DIST_RUN_STAMP=${MOE_DIST_RUN_STAMP:-$(date +%Y-%m-%d_%H-%M-%S)}
RUN_DIR=${RUN_DIR:-runs/demo_${MOE_DIST_RUN_STAMP}}
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m moe_dist.train \
  experiment=cpu_demo trainer.out_dir="$RUN_DIR" "$@"
"$PYTHON" scripts/plot_run.py "$RUN_DIR"
echo "run directory: $RUN_DIR (metrics.jsonl, checkpoints/, loss.png, expert_load.png)"
