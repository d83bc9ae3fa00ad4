#!/usr/bin/env bash
# Wall time of one pipeline run here (`--executor local`) and through Slurm (`--executor slurm`,
# the one-node cluster of scripts/slurm-cluster.sh or any other), back to back, each from an
# empty run directory of its own (`runs/` under a working directory of its own); assets and SVD
# factors come from $TSQ_HOME's cache for both.
#
#   scripts/bench_slurm.sh PIPELINE [--set path=value ...]     # the --sets go to both runs
#
# Environment: TSQ (default target/release/tsq), RESOURCES (the `executor.resources` section as
# YAML flow, default "{default: {cpus: 2}}": a copy of the pipeline beside it gets it, removed
# after; it changes no cache key), LOCAL=0 (skip the local run).
set -euo pipefail
cd "$(dirname "$0")/.."
pipeline=$1
shift
tsq="$(realpath "${TSQ:-target/release/tsq}")"
runs="$(mktemp -d)"
copy="$(realpath "$(dirname "$pipeline")")/.bench-slurm-$$.yaml"
trap 'rm -f "$copy"' EXIT
resources="${RESOURCES:-}"
[ -n "$resources" ] || resources='{default: {cpus: 2}}'
{ cat "$pipeline"; printf '\nexecutor:\n  resources: %s\n' "$resources"; } >"$copy"

timed() {
  local label=$1 start end
  shift
  mkdir -p "$runs/$label"
  start=$(date +%s.%N)
  (cd "$runs/$label" && "$tsq" run "$copy" "$@") >"$runs/$label.out" 2>"$runs/$label.err" ||
    { echo "$label failed:" >&2; tail -20 "$runs/$label.err" >&2; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}

local_s=skipped
[ "${LOCAL:-1}" = 0 ] || local_s=$(timed local "$@" --executor local)
slurm_s=$(timed slurm "$@" --executor slurm)
echo "$pipeline: local ${local_s} s, slurm ${slurm_s} s (resources $resources)"
python3 - "$runs" <<'PY'
import json, sys, pathlib
# When each stage ran in the Slurm run (its event log), relative to the first start.
events = pathlib.Path(sys.argv[1], "slurm", "runs").glob("*/events.jsonl")
spans = {}
for path in events:
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e.get("event") in ("stage_started", "stage_finished"):
            spans.setdefault(e["stage"], {})[e["event"]] = e["ts"]
if spans:
    t0 = min(s.get("stage_started", 1e18) for s in spans.values())
    for stage, s in sorted(spans.items(), key=lambda kv: kv[1].get("stage_started", 0)):
        if "stage_started" in s and "stage_finished" in s:
            print(f"  {stage:24} {s['stage_started'] - t0:8.1f} s -> {s['stage_finished'] - t0:8.1f} s")
PY
echo "outputs: $runs"
