#!/usr/bin/env bash
# One process on this machine (CPU, or the first GPU when there is one).
#   launch/single.sh configs/quickstart.yaml train.max_steps=50 run.dir=/tmp/r1
# Several processes: torchrun --standalone --nproc_per_node=N -m moe_dist.train ... (README,
# "Expert parallelism"); deepspeed, mpirun and SLURM scripts are still to come.
set -euo pipefail
config=${1:?usage: launch/single.sh CONFIG [section.key=value ...]}
shift
exec python -m moe_dist.train --config "$config" "$@"
