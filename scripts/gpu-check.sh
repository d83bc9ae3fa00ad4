#!/usr/bin/env bash
# Issue 21's proof on a lent GPU, in one call of the device tool: tsq built with CUDA against
# PyTorch/transformers on the same GPU, on random-weight models the script makes there
# (SmolLM2-135M's shape, Llama-3.2-1B's, Llama-3.1-8B's, Qwen3-0.6B's). Writes $OUT/gpu-check.json (every
# part's figures and each check against the issue's target) and $OUT/logs/.
#
# Here, first: `scripts/gpu-check.sh --prepare` builds the release binary with CUDA and packs it
# into dist/tsq-cuda.xz (~15 MB: the binary is ~100 MB, mostly kernels, over one call's carry);
# then with the device tool: run(command="scripts/gpu-check.sh", carry=["dist/tsq-cuda.xz"],
# timeout_s=540), and give the machine back.
#
# A dry run of the whole script on this machine's CPU (the `tiny` shape, a CPU build of tsq,
# a Python with torch, transformers and tokenizers, e.g. the peers' venv):
#   PYTHON=~/.cache/tsq-peers/venv/bin/python TSQ_BIN=target/release/tsq scripts/gpu-check.sh --cpu
#
# Parts run in order of importance, each under its own time limit and all within
# $GPU_CHECK_SECONDS (default 500: one device call allows 600); one that fails or runs out of
# time is recorded as failed, one there is no time left for as skipped, and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  --cpu) mode=cpu ;;
  --prepare)
    scripts/build-cuda.sh build --release --locked || exit 1
    mkdir -p dist
    strip -o dist/tsq-cuda "${TSQ_CUDA_HOME:-$HOME/.cache/tsq-cuda}/target/release/tsq"
    xz -T0 -9 -f dist/tsq-cuda && ls -l dist/tsq-cuda.xz
    exit
    ;;
esac
out="${OUT:-target/gpu-check}"
work="${TMPDIR:-/tmp}/tsq-gpu-check"
parts="$work/parts"
rm -rf "$work" && mkdir -p "$parts" "$out/logs"
python="${PYTHON:-python3}"
check=scripts/gpu_check.py
export TSQ_HOME="$work/home"

if [[ $mode == gpu ]]; then
  tsq="${TSQ_BIN:-$work/tsq}"
  if [[ -z ${TSQ_BIN:-} ]]; then
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      dist/tsq-cuda.xz "$tsq" && chmod +x "$tsq"
  fi
  device=cuda small=smol mid=llama1b big=llama8b qwen=qwen3
  wide=64 svf_batch=8 svf_seq=512 svf_prompt=64
  # cuBLAS, cuRAND and NVRTC from the Python's CUDA 13 packages; libcuda is the driver's.
  nvidia_lib="$("$python" -c 'import nvidia.cu13 as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)"
  export LD_LIBRARY_PATH="$nvidia_lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
else
  tsq="${TSQ_BIN:-target/release/tsq}"
  device=cpu small=tiny mid=tiny big= qwen=qwen3tiny
  wide=4 svf_batch=2 svf_seq=64 svf_prompt=16
fi
tsq="$(realpath "$tsq")"
py() { "$python" "$check" --device "$device" "$@"; }
log() { echo "[$(date +%T)] $*" >&2; }

budget="${GPU_CHECK_SECONDS:-500}"

# part NAME SECONDS COMMAND...: COMMAND's stdout becomes the part (JSON, or JSON as its last
# line), its stderr logs/NAME.log.
part() {
  local name=$1 limit=$2 status left=$((budget - SECONDS))
  shift 2
  if ((left < 15)); then
    echo '{"skipped": "no time left in the script'"'"'s budget"}' >"$parts/$name.json"
    return
  fi
  ((limit > left)) && limit=$left
  log "$name"
  # Through bash so that COMMAND may be one of the functions below (exported in `main`).
  timeout "$limit" bash -c '"$@"' _ "$@" >"$work/$name.out" 2>"$out/logs/$name.log"
  status=$?
  if ((status == 0)); then
    cp "$work/$name.out" "$parts/$name.json"
  else
    local why="exit $status"
    ((status == 124)) && why="out of time after $limit s"
    echo "{\"failed\": \"$why\", \"log\": \"logs/$name.log\"}" >"$parts/$name.json"
  fi
}

# Peak device memory (MiB, nvidia-smi's view, both programs alike) while COMMAND runs.
with_memory() {
  local name=$1 limit=$2
  shift 2
  if [[ $mode == cpu ]]; then
    part "$name" "$limit" "$@"
    return
  fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/$name.mem" &
  local poll=$!
  part "$name" "$limit" "$@"
  kill "$poll" 2>/dev/null
  local peak
  peak="$(sort -n "$work/$name.mem" | tail -1)"
  [[ -n $peak ]] && echo "{\"peak_device_mib\": $peak}" >"$parts/$name-memory.json"
}

environment() {
  local gpu="none"
  [[ $mode == gpu ]] && gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  "$python" -c "
import json, sys, torch, transformers
print(json.dumps({'gpu': sys.argv[1], 'tsq': sys.argv[2], 'torch': torch.__version__,
                  'transformers': transformers.__version__, 'cpus': __import__('os').cpu_count()}))
" "$gpu" "$("$tsq" --version)"
}

# A small pipeline on the small model: decompose, train an expert (RL, 2 steps), evaluate.
pipeline() {
  local dir="$work/pipeline"
  mkdir -p "$dir/cards" "$dir/templates" "$dir/data"
  for i in $(seq 0 319); do
    local q="t$((i % 97 + 5)) t$((i % 13 + 3)) t$((i * 7 % 89 + 2)) t9 t$((i % 31 + 40)) ?"
    local options="\"t$((i % 50 + 20))\", \"t$((i % 40 + 70))\", \"t$((i % 30 + 111)) t4\", \"t$((i % 20 + 150))\""
    echo "{\"doc\": {\"key\": \"q$i\", \"text\": \"$q\", \"options\": [$options], \"gold\": $((i % 4))}}"
  done >"$dir/data/items.jsonl"
  cat >"$dir/cards/items.yaml" <<'EOF'
name: items
license: MIT
source: ../data/items.jsonl
record: doc
fields: {id: key, question: text, choices: options, gold: gold}
records: 320
EOF
  printf '%s\n' '{{ question }}' '{% for c in choices %}{{ c }}' '{% endfor %}' >"$dir/templates/question.jinja"
  cat >"$dir/gpu.yaml" <<EOF
version: 1
name: gpu
seed: 3
run_dir: runs
model:
  source: $work/models/$small
  device: $device
  dtype: bf16
svd:
  targets: ['mlp\\.(gate|up)_proj']
datasets:
  items:
    card: cards/items.yaml
    prompt: templates/question.jinja
    split: {train: 16, val: 4, test: 300}
rewards:
  choice: {kind: multiple_choice}
experts:
  items:
    dataset: items
    reward: choice
    train: {rollout: options, steps: 2, prompts_per_step: 2, validate_every: 2, validate_limit: 2}
evaluate:
  - {dataset: items, mode: loglik, reward: choice, with: [base, items]}
EOF
  local started=$SECONDS
  (cd "$dir" && "$tsq" run gpu.yaml >&2) || { echo '{"finished": false}'; return; }
  "$python" -c "
import json, sys
training = json.load(open(sys.argv[1]))
print(json.dumps({'finished': True, 'seconds': int(sys.argv[2]), 'engine': training['engine']}))
" "$dir/runs/gpu/train.items/training.json" $((SECONDS - started))
}

# Option scoring speed on the pipeline's 300 test items: tsq's evaluation path, then lm-eval's way
# in transformers on the items tsq wrote.
score_speed_tsq() {
  "$tsq" bench eval "$work/pipeline/gpu.yaml" eval.items --write-items "$work/items.jsonl"
}

# tsq's per-token log-probabilities of a few continuations, then transformers' for the same ids.
score_parity() {
  local shape=$1 dtype=$2 file="$work/score-$1-$2.tsq.json"
  "$tsq" score --model "$work/models/$shape" --device "$device" --dtype "$dtype" --format json \
    --prompt "t11 t37 t3 t90 t45 t12 t7 t301 t88 t5 t64 t19" \
    --continuation " t23 t99 t4 t17 t250 t6" --continuation " t8" \
    --continuation " t42 t42 t42 t310 t2 t9 t71 t13 t100 t3 t5 t6 t7 t8 t9 t10" >"$file" || return
  "$python" "$check" --device "$device" --dtype "$dtype" score "$work/models/$shape" "$file"
}

# One SVF step's loss and z-gradients from tsq (written by the bench), then from torch autograd.
svf_parity() {
  local shape=$1 dtype=$2 file="$work/svf-$1-$2.tsq.json"
  "$tsq" bench svf-step --model "$work/models/$shape" --device "$device" --dtype "$dtype" \
    --batch 2 --seq 96 --prompt 16 --steps 1 --layers 4 --gradients "$file" >&2 || return
  py svf "$work/models/$shape" "$file"
}

main() {
  export -f py log environment pipeline score_parity svf_parity score_speed_tsq
  export tsq python check device work small mode qwen
  part env 60 environment
  mkdir -p "$work/models"
  part "make-$small" 120 py make "$small" "$work/models/$small"
  part pipeline 180 pipeline
  part score-speed-tsq 90 score_speed_tsq
  part score-speed-torch 90 py --dtype bf16 score-speed "$work/models/$small" "$work/items.jsonl"
  for dtype in f32 bf16; do
    part "score-$small-$dtype" 60 score_parity "$small" "$dtype"
    part "svf-parity-$dtype" 90 svf_parity "$small" "$dtype"
  done
  if [[ $mid != "$small" ]]; then
    part "make-$mid" 120 py make "$mid" "$work/models/$mid"
    part "score-$mid-bf16" 60 score_parity "$mid" bf16
  fi
  part speed-torch 120 py --dtype bf16 --batch "$wide" speed "$work/models/$mid"
  part speed-tsq 120 "$tsq" bench generate --model "$work/models/$mid" --device "$device" \
    --dtype bf16 --batch "$wide"
  with_memory svf-speed-torch 120 py --dtype bf16 --batch "$svf_batch" --seq "$svf_seq" \
    --prompt "$svf_prompt" svf-speed "$work/models/$mid"
  with_memory svf-speed-tsq 180 "$tsq" bench svf-step --model "$work/models/$mid" \
    --device "$device" --dtype bf16 --batch "$svf_batch" --seq "$svf_seq" --prompt "$svf_prompt" --steps 2
  part rl-step-torch 120 py --dtype bf16 rl-step "$work/models/$mid"
  part rl-step-tsq 120 "$tsq" bench rl-step --model "$work/models/$mid" --device "$device" --dtype bf16
  part svd-torch 120 py svd "$work/models/$mid"
  part svd-tsq 180 "$tsq" bench svd --model "$work/models/$mid"
  if [[ -n $big ]]; then
    part "make-$big" 180 py make "$big" "$work/models/$big"
    with_memory svf-memory-8b 240 "$tsq" bench svf-step --model "$work/models/$big" \
      --device "$device" --dtype bf16 --batch "$svf_batch" --seq "$svf_seq" --prompt "$svf_prompt" \
      --steps 1 --layers 2
  fi
  # Beyond the issue's list, last: Qwen3's head norms on the device (scoring, and one SVF
  # step's gradients through them).
  part "make-$qwen" 120 py make "$qwen" "$work/models/$qwen"
  part "score-$qwen-bf16" 60 score_parity "$qwen" bf16
  part "svf-parity-$qwen-f32" 90 svf_parity "$qwen" f32
  "$python" "$check" summary "$parts" >"$out/gpu-check.json"
  log "wrote $out/gpu-check.json"
}

main
