#!/usr/bin/env bash
# mpirun: rank and world come from MPI (mpi4py); rank 0 picks a free port and broadcasts
# its address, then torch.distributed starts from env:// (moe_dist/parallel/layout.py).
#
#   One node, 4 processes:   NP=4 launch/mpirun.sh configs/quickstart.yaml parallel.ep=4
#   Several nodes:           NP=16 HOSTFILE=hosts launch/mpirun.sh CONFIG parallel.ep=8
# Needs the [mpi] extra: pip install torch==2.13.0 -e '.[mpi]' (mpi4py + mpich from PyPI).
# Extra mpirun flags go in MPIRUN_ARGS (Open MPI as root: --allow-run-as-root --oversubscribe).
set -euo pipefail
config=${1:?usage: launch/mpirun.sh CONFIG [section.key=value ...]}
shift
args=(-n "${NP:-1}")
[[ -n "${HOSTFILE:-}" ]] && args+=(-f "$HOSTFILE")
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} python -m moe_dist.train --config "$config" "$@"
