#!/usr/bin/env bash
# tsq serve (f32, then --decode-q8) beside llama.cpp's server (llama-cpp-python[server]) on the
# same model, back to back, driven by the same client (scripts/bench_serve.py) at 1, 8 and 32
# concurrent clients.
#
#   scripts/bench_serve_vs_llamacpp.sh RUN_DIR GGUF...
#
# RUN_DIR: a finished run of the model (e.g. a pipeline with only `model:`); each GGUF is served
# by llama.cpp in turn (the packaged Q4_1, an f32 one from shared/peers/make_f32_gguf.py, a Q8_0
# one of that from scripts/quantize_gguf.py), with
# `--interrupt_requests false`: by default a new request cancels the one running, so under
# concurrency most answers would come back empty.
# Environment: TSQ (default target/release/tsq), CLIENT_PYTHON (a Python with `openai`, default
# scripts/test's virtualenv), LLAMA_PYTHON (one with llama-cpp-python[server], default the
# peers' venv-llama), REQUESTS (32), MAX_TOKENS (32), THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=$1
shift
tsq="${TSQ:-target/release/tsq}"
client="${CLIENT_PYTHON:-$HOME/.cache/tsq-test-venv/bin/python}"
llama="${LLAMA_PYTHON:-$HOME/.cache/tsq-peers/venv-llama/bin/python}"
requests="${REQUESTS:-32}"
max_tokens="${MAX_TOKENS:-32}"
threads="${THREADS:-$(nproc)}"

# llama-cpp-python's server needs its `[server]` extras, which the peers' venv-llama may lack.
if ! "$llama" -c 'import llama_cpp.server.app' 2>/dev/null; then
  echo "$llama cannot run llama_cpp.server; install its extras with:" >&2
  echo "  $llama -m pip install uvicorn fastapi sse-starlette starlette-context pydantic-settings" >&2
  exit 1
fi

wait_for() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return
    sleep 0.5
  done
  echo "no server on port $1" >&2
  exit 1
}

bench() {
  local label=$1 port=$2 model=$3 pid=$4
  wait_for "$port"
  "$client" scripts/bench_serve.py "http://127.0.0.1:$port" "$model" --clients 1,8,32 \
    --requests "$requests" --max-tokens "$max_tokens" --pid "$pid" --label "$label"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

name="$(basename "$run_dir")"
"$tsq" serve "$run_dir" --port 8101 --max-batch 32 --max-queue 64 2>/dev/null &
bench "tsq serve (f32)" 8101 "$name" $!
"$tsq" serve "$run_dir" --port 8103 --max-batch 32 --max-queue 64 --decode-q8 2>/dev/null &
bench "tsq serve --decode-q8" 8103 "$name" $!
for gguf in "$@"; do
  "$llama" -m llama_cpp.server --model "$gguf" --port 8102 --n_threads "$threads" \
    --n_ctx 2048 --interrupt_requests false >/dev/null 2>&1 &
  bench "llama.cpp server ($(basename "$gguf"))" 8102 "$gguf" $!
done
