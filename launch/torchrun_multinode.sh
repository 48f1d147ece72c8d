#!/bin/bash
# Multi-node moe_dist training without Slurm: run this on every node with the same settings, e.g.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 RUN_ID=moe_run1 \
#       launch/torchrun_multinode.sh experiment=gpu_8x parallel.ep=8
# Arguments are Hydra overrides for moe_dist.train, passed through unchanged.
#
# Environment knobs:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  ranks per node (default: the GPUs nvidia-smi lists, else 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, one of the nodes (default localhost:29500; required
#                   when NNODES > 1)
#   RUN_ID          identical on every node: the rendezvous id and the run directory name
#                   (outputs/<RUN_ID> unless trainer.out_dir is given); required when NNODES > 1,
#                   default on one node: the current date and time
#   PYTHON          python to run torchrun with, as "$PYTHON -m torch.distributed.run" (default: unset)
#   TORCHRUN        torchrun command (default: torchrun, or the above when PYTHON is set)
#   MAX_RESTARTS    torchrun --max-restarts (default 0)

set -euo pipefail

die() {
    echo "torchrun_multinode.sh: error: $*" >&2
    exit 2
}

NNODES=${NNODES:-1}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        NUM_GPUS=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
        if ((NUM_GPUS > 0)); then
            NPROC_PER_NODE=$NUM_GPUS
        fi
    fi
fi
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
if ((NNODES > 1)); then
    [[ -n ${RDZV_ENDPOINT:-} ]] || die "RDZV_ENDPOINT=host:port is required when NNODES > 1"
    [[ -n ${RUN_ID:-} ]] || die "RUN_ID is required when NNODES > 1 (the same string on every node)"
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RUN_ID=${RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}

if [[ -n ${PYTHON:-} ]]; then
    TORCHRUN=${TORCHRUN:-$PYTHON -m torch.distributed.run}
fi
read -r -a TORCHRUN_CMD <<<"${TORCHRUN:-torchrun}"

# Same on every rank of every node: the run directory name (moe_dist.train reads it).
export MOE_DIST_RUN_STAMP=$RUN_ID

echo "torchrun_multinode.sh: $NNODES node(s) x $NPROC_PER_NODE ranks | rendezvous $RDZV_ENDPOINT id $RUN_ID"
exec "${TORCHRUN_CMD[@]}" \
    --nnodes="$NNODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" \
    --rdzv_id="$RUN_ID" \
    --max_restarts="${MAX_RESTARTS:-0}" \
    -m moe_dist.train "$@"
