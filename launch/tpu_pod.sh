#!/usr/bin/env bash
# Run one experiment on every worker of a Cloud TPU VM slice (e.g. v5e-16, v5p-32) from your workstation.
#
# Usage:
#     launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo-dir DIR] [--setup] -- LAUNCH_ARGS...
#   Runs `python -m medad_jax.launch LAUNCH_ARGS` on all workers at once through
#   `gcloud compute tpus tpu-vm ssh NAME --worker=all`. Every worker runs the same command: on a TPU slice
#   jax.distributed.initialize() finds the coordinator, the process count and this worker's id by itself, and each
#   process feeds its share of the batch (medad_jax.launch). LAUNCH_ARGS must include --config=...
#   --repo-dir   where this repository is on the workers (default: ~/medad_jax; copy it there first, e.g.
#                gcloud compute tpus tpu-vm scp --recurse --worker=all . NAME:~/medad_jax --zone ZONE).
#   --setup      first install the pinned requirements plus JAX's TPU runtime on every worker.
#   Example:
#     launch/tpu_pod.sh --tpu medad-v5e-16 --zone us-west4-a -- --config=congrpo:paper \
#         --config.model.checkpoint=/mnt/ckpt/Qwen2.5-VL-3B-Instruct --config.data.dir=/mnt/MedAD-38K \
#         --config.mesh.data=-1 --workdir=/mnt/shared/runs/congrpo-paper
#   The workdir must be a directory every worker sees (NFS / Filestore, or a GCS FUSE mount): orbax writes
#   checkpoints from all processes.
#
# Environment: GCLOUD (default gcloud), TPU_PYTHON (python on the workers, default python3), DRY_RUN=1 (print the
# commands and exit). Each command is printed (shell-quoted, after "+ ") before it runs; the python command that
# runs on the workers is printed on its own line too.
set -euo pipefail

# Shell-quotes only the words that need it, so the printed command can be pasted back into a shell.
quote() {
  local out=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

tpu="" zone="" project="" repo_dir='~/medad_jax' setup=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo-dir) repo_dir="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (launch arguments go after --; see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: --tpu and --zone are required (see --help)" >&2; exit 2; }
has_config=0
for a in "$@"; do [[ "$a" == --config=* || "$a" == --config ]] && has_config=1; done
(( has_config )) || { echo "tpu_pod.sh: give the experiment after --, e.g. -- --config=congrpo:paper" >&2; exit 2; }

python_bin="${TPU_PYTHON:-python3}"
gcloud_bin="${GCLOUD:-gcloud}"
ssh=("$gcloud_bin" compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all)
[[ -n "$project" ]] && ssh+=("--project=$project")

launch=("$python_bin" -m medad_jax.launch "$@")
echo "+ $(quote "${launch[@]}")"
# The same command runs on every worker; jax.distributed finds the coordinator and this worker's id itself.
echo "tpu_pod.sh: per-host command (every worker): $(quote "${launch[@]}")" >&2
remote="cd $repo_dir && $(quote "${launch[@]}")"
steps=()
if (( setup )); then
  steps+=("cd $repo_dir && $python_bin -m pip install -r requirements.txt 'jax[tpu]==0.10.2'")
fi
steps+=("$remote")
for s in "${steps[@]}"; do
  cmd=("${ssh[@]}" "--command=$s")
  echo "+ $(quote "${cmd[@]}")"
  [[ "${DRY_RUN:-0}" == 1 ]] || "${cmd[@]}"
done
