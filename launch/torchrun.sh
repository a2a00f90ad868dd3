#!/usr/bin/env bash
# torchrun on one node or many. Every node runs this script with the same config.
#
#   One node, 4 processes:
#     NPROC=4 launch/torchrun.sh configs/quickstart.yaml parallel.ep=4
#   Two nodes x 8 GPUs (run on both; node 0's address as MASTER_ADDR):
#     NNODES=2 NODE_RANK=0 NPROC=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 launch/torchrun.sh CONFIG parallel.ep=8
#     NNODES=2 NODE_RANK=1 NPROC=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 launch/torchrun.sh CONFIG parallel.ep=8
#   Or an elastic rendezvous endpoint instead of NODE_RANK/MASTER_*:
#     NNODES=2 NPROC=8 RDZV_ENDPOINT=host0:29400 RDZV_ID=job42 launch/torchrun.sh CONFIG
# Environment: NPROC (default: GPUs on this node, else 1), NNODES (1), NODE_RANK (0; required
# when NNODES > 1 without RDZV_ENDPOINT),
# MASTER_ADDR/MASTER_PORT (one node: a free local port), RDZV_ENDPOINT, RDZV_ID.
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [section.key=value ...]}
shift
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
nnodes=${NNODES:-1}
args=(--nproc_per_node "$nproc" --nnodes "$nnodes")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  args+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-moe_dist}")
elif [[ "$nnodes" == 1 && -z "${MASTER_PORT:-}" ]]; then
  args+=(--standalone)
else
  # Several nodes: NODE_RANK is required (a default of 0 on every node would give
  # duplicate ranks and a rendezvous that hangs until the timeout).
  if [[ "$nnodes" != 1 && -z "${NODE_RANK:-}" ]]; then
    echo "error: NNODES=$nnodes needs NODE_RANK (0..$((nnodes - 1))) on every node, or RDZV_ENDPOINT" >&2
    exit 2
  fi
  args+=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:?set MASTER_PORT}")
fi
exec python -m torch.distributed.run "${args[@]}" -m moe_dist.train --config "$config" "$@"
