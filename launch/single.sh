#!/usr/bin/env bash
# One process on this machine (CPU, or the first GPU when there is one).
#   launch/single.sh configs/quickstart.yaml train.max_steps=50 run.dir=/tmp/r1
# Multi-process launchers (torchrun, deepspeed, mpirun, SLURM) arrive with expert parallelism.
set -euo pipefail
config=${1:?usage: launch/single.sh CONFIG [section.key=value ...]}
shift
exec python -m moe_dist.train --config "$config" "$@"
