#!/usr/bin/env bash
# The deepspeed launcher: it sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for every process.
#
#   One node, 4 processes (CPU or GPUs):  NPROC=4 launch/deepspeed.sh configs/quickstart.yaml parallel.ep=4
#   Several nodes, from a hostfile ("host0 slots=8" per line):
#     HOSTFILE=hosts launch/deepspeed.sh CONFIG parallel.ep=8
# pdsh is not needed on one node; several nodes use DeepSpeed's default (pdsh) unless
# DS_LAUNCHER names another (e.g. mpich, openmpi). Not slurm: DeepSpeed's SLURM runner drops
# --module (it runs "python -u moe_dist.train"); under SLURM use launch/slurm.sbatch.
set -euo pipefail
if [[ "${DS_LAUNCHER:-}" == slurm ]]; then
  echo "error: DS_LAUNCHER=slurm: DeepSpeed's SLURM runner cannot start a module (python -m moe_dist.train); use launch/slurm.sbatch" >&2
  exit 2
fi
config=${1:?usage: launch/deepspeed.sh CONFIG [section.key=value ...]}
shift
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
port=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")}
args=(--master_port "$port" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  [[ -n "${DS_LAUNCHER:-}" ]] && args+=(--launcher "$DS_LAUNCHER")
else
  args+=(--num_gpus "${NPROC:-1}")
fi
exec deepspeed "${args[@]}" --module moe_dist.train --config "$config" "$@"
