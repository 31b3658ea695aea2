#!/usr/bin/env bash
# Run one experiment on this machine: CPU, one GPU host, or a single-host TPU VM.
#
# Usage:
#     launch/local.sh [--config=congrpo:paper] [--workdir=runs/NAME] [--config.KEY=VALUE ...]
#   Every argument goes to `python -m medad_jax.launch` unchanged (absl flags). Without --config it runs the
#   embedded CPU miniature, congrpo (configs/congrpo.py: SFT, Con-GRPO and evaluation on synthetic data).
#   Examples:
#     launch/local.sh                                             # the miniature, a few minutes on a CPU
#     launch/local.sh --config=congrpo:paper --config.model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct \
#         --config.data.dir=/data/MedAD-38K --config.judge.url=http://judge-host:30000
#
# Environment: PYTHON (interpreter, default python3), DRY_RUN=1 (print the command and exit without running it).
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
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-python3}"
args=("$@")
has_config=0
for a in "${args[@]}"; do [[ "$a" == --config=* || "$a" == --config ]] && has_config=1; done
(( has_config )) || args=(--config=congrpo "${args[@]}")

cmd=("$python_bin" -m medad_jax.launch "${args[@]}")
echo "+ $(quote "${cmd[@]}")"
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
exec "${cmd[@]}"
