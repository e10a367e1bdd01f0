#!/usr/bin/env bash
# bench/DEMO.md's runs: the README's first command in a fresh clone and virtual environment, N times
# "idle" and N times "busy" (one busy loop per core for the first 60 s), alternating.
# Usage: bench/demo_runs.sh OUT_DIR [N]   (one JSON line per run in OUT_DIR/runs.jsonl)
set -uo pipefail
out=$(realpath -m "${1:?usage: bench/demo_runs.sh OUT_DIR [N]}"); n=${2:-5}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
git clone -q "$repo" "$out/src" && cd "$out/src" || exit 1
commit=$(git rev-parse --short HEAD)
python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 -e . || exit 1
for i in $(seq 1 "$n"); do
  for cond in idle busy; do
    rm -rf nightlab-demo
    start=$(date +%s)
    if [ "$cond" = busy ]; then
      for _ in $(seq 1 "$(nproc)"); do timeout 60 python3 -c "while True: pass" & done
    fi
    nightlab demo > "$out/$cond-$i.log" 2>&1
    rc=$?
    last=$(grep -h "experiment(s) kept" "$out/$cond-$i.log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')
    echo "{\"commit\": \"$commit\", \"set\": \"$cond\", \"run\": $i, \"rc\": $rc, \"wall_s\": $(( $(date +%s) - start )), \"load_after\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"ended_with\": $last}" >> "$out/runs.jsonl"
  done
done
