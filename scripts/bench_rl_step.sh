#!/usr/bin/env bash
# `tsq bench rl-step` beside the PyTorch peers, back to back in one session (this machine drifts
# 10-35% between runs: only same-session ratios mean anything): a generated-rollout step against
# torch_svf_bench.py, and an option-rollout step on 8 `eval.logic` items against
# torch_score_bench.py scoring the same items. Needs the peer virtualenv of
# shared/peers/README.md ($PEERS_HOME/venv, SmolLM2 unpacked under $PEERS_HOME/models) and a
# release build. Waits until the machine is quiet before each measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PEERS_HOME:=$HOME/.cache/tsq-peers}"
: "${PEERS_DIR:=../shared/peers}"
: "${TSQ:=${CARGO_TARGET_DIR:-target}/release/tsq}"
export PEERS_HOME
out=$(mktemp -d)
wait_quiet() {
  while awk '{exit !($1 >= 0.7)}' /proc/loadavg; do echo "load $(cut -d' ' -f1 /proc/loadavg), waiting" >&2; sleep 20; done
}
# One step's option items: the first 8 of the logic evaluation, rendered as tsq scores them.
"$TSQ" run pipelines/eval_base.yaml --only model --only data.logic >&2
"$TSQ" bench eval pipelines/eval_base.yaml eval.logic --limit 8 --write-items "$out/items.jsonl" >&2
wait_quiet
"$PEERS_HOME/venv/bin/python" "$PEERS_DIR/torch_svf_bench.py" --parts svf,rollout --source gguf | tee "$out/peer.json"
wait_quiet
"$PEERS_HOME/venv/bin/python" "$PEERS_DIR/torch_score_bench.py" "$out/items.jsonl" --batch 16 | tee "$out/peer_score.json"
wait_quiet
"$TSQ" bench rl-step --peer "$out/peer.json" --options "$out/items.jsonl" --peer-score "$out/peer_score.json"
