#!/usr/bin/env bash
#SBATCH --job-name=medad
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
# Multi-node GPU training under Slurm: one task (one JAX process) per node, each driving all GPUs of its node.
#
# Usage (from the repository root; edit the #SBATCH lines or override them on the command line):
#     sbatch [--nodes=4] launch/slurm.sh --config=congrpo:paper \
#         --config.model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.dir=/data/MedAD-38K \
#         --config.judge.url=http://judge-host:30000 --workdir=/shared/runs/congrpo-paper
#   Every argument goes to `python -m medad_jax.launch` unchanged; --config=... is required. The job runs
#   `srun --ntasks-per-node=1 python -m medad_jax.launch ...`: inside the srun step, jax.distributed.initialize()
#   reads SLURM_STEP_NODELIST (coordinator = first node), SLURM_NTASKS (process count) and SLURM_PROCID (process
#   id) by itself. The workdir must be on a filesystem every node sees (orbax writes checkpoints from all
#   processes).
#
# Environment: PYTHON (interpreter on the nodes, default python3), DRY_RUN=1 (print the command and exit; works
# outside Slurm too). XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75 of each GPU) is passed through if set.
# The command is printed (shell-quoted, after "+ ") before it runs.
set -euo pipefail

# Shell-quotes only the words that need it, so the printed command can be pasted back into a shell.
quote() {
  local out=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

has_config=0
for a in "$@"; do [[ "$a" == --config=* || "$a" == --config ]] && has_config=1; done
(( has_config )) || { echo "slurm.sh: give the experiment, e.g. --config=congrpo:paper (see the header)" >&2; exit 2; }

python_bin="${PYTHON:-python3}"
per_host=("$python_bin" -m medad_jax.launch "$@")
cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${per_host[@]}")
echo "+ $(quote "${cmd[@]}")"
# What srun starts on every node (the same command everywhere; each process finds its id in SLURM_PROCID).
echo "slurm.sh: per-host command: $(quote "${per_host[@]}")" >&2
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm.sh: not inside a Slurm job; submit it with sbatch launch/slurm.sh ... (or set DRY_RUN=1)" >&2
  exit 2
fi
echo "slurm.sh: job $SLURM_JOB_ID, ${SLURM_JOB_NUM_NODES:-?} node(s)" >&2
exec "${cmd[@]}"
