#!/usr/bin/env bash
# Start the Con-GRPO consistency judge as an SGLang server, wait until /health answers, stop it on exit.
#
# Install SGLang on the judge host (a CUDA GPU host; it is NOT a dependency of medad_jax and brings its own
# torch, so use a separate environment):
#     python3 -m venv ~/sglang-env && ~/sglang-env/bin/pip install --upgrade pip
#     ~/sglang-env/bin/pip install "sglang[all]"
#     export JUDGE_PYTHON=~/sglang-env/bin/python
# (see https://docs.sglang.ai for the wheel matching your CUDA version).
#
# Usage:
#     launch/judge_sglang.sh --model MODEL [--port 30000] [--host 0.0.0.0] [--timeout 900] \
#         [--extra "--tp 2 --mem-fraction-static 0.8"] [-- COMMAND ARGS...]
#   With COMMAND: runs it once the judge is healthy, with MEDAD_SGLANG_URL exported (e.g. the trainer with
#   --config.judge.url=$MEDAD_SGLANG_URL), then stops the judge and exits with COMMAND's status.
#   Without: keeps the judge up until Ctrl-C / SIGTERM.
#   The judge reads text only (question + thought), so any instruct LLM works, e.g. Qwen/Qwen2.5-7B-Instruct.
#
# Needs bash, curl and setsid on the judge host.
# Environment: JUDGE_PYTHON (interpreter with sglang; default python3), JUDGE_LAUNCH (replaces
# "$JUDGE_PYTHON -m sglang.launch_server", e.g. a site wrapper or the test stand-in
# "python3 -m medad_jax.testing.fake_server"), JUDGE_LOG (server log file; default a temp file).
set -euo pipefail

model="" port=30000 host=127.0.0.1 timeout=900 extra=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --extra) extra="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "judge_sglang.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$model" ]] || { echo "judge_sglang.sh: --model is required (see --help)" >&2; exit 2; }

python_bin="${JUDGE_PYTHON:-python3}"
launch="${JUDGE_LAUNCH:-$python_bin -m sglang.launch_server}"
log="${JUDGE_LOG:-$(mktemp -t sglang-judge.XXXXXX.log)}"
# The health probe connects locally when the server listens on all interfaces.
probe_host="$host"; [[ "$host" == "0.0.0.0" ]] && probe_host=127.0.0.1
url="http://${probe_host}:${port}"

# shellcheck disable=SC2086  # $launch and $extra are word lists on purpose
setsid $launch --model-path "$model" --host "$host" --port "$port" $extra >"$log" 2>&1 &
server_pid=$!
echo "judge_sglang.sh: started judge (pid $server_pid, log $log)" >&2

stop_server() {
  if kill -0 "$server_pid" 2>/dev/null; then
    echo "judge_sglang.sh: stopping judge (pid $server_pid)" >&2
    kill -TERM -- "-$server_pid" 2>/dev/null || true  # setsid: the server leads its own process group
    for _ in $(seq 1 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$server_pid" 2>/dev/null || true
  fi
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

deadline=$(( $(date +%s) + timeout ))
until curl -fsS -o /dev/null --max-time 5 "$url/health" 2>/dev/null; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "judge_sglang.sh: judge exited before becoming healthy; last log lines:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  if (( $(date +%s) > deadline )); then
    echo "judge_sglang.sh: judge not healthy at $url/health after ${timeout}s; last log lines:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  sleep 1
done
echo "judge_sglang.sh: judge healthy at $url" >&2
export MEDAD_SGLANG_URL="$url"

if [[ $# -gt 0 ]]; then
  set +e
  "$@"
  status=$?
  set -e
  exit "$status"
fi
wait "$server_pid"
