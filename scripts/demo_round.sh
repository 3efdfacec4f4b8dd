#!/usr/bin/env bash
# One federated round on this machine, as the demo runs it: mos-server + mos-client alice + mos-client bob, then
# `mos sample` draws both concepts together, each in its own half. Needs the package installed (scripts/demo.sh
# sets up first; tests/test_demo.py calls this directly).
#   OUT=mos-out STATE=mos-state BASE=world STEPS= PORT=9092 bash scripts/demo_round.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export TRANSFORMERS_VERBOSITY=error FLWR_TELEMETRY_ENABLED=0 OMP_NUM_THREADS=1
OUT=${OUT:-mos-out}
STATE=${STATE:-mos-state}
BASE=${BASE:-world}
STEPS=${STEPS:-}
PORT=${PORT:-9092}
rm -rf "$OUT" "$STATE"          # a fresh round each time (clients keep their tuned adapters in their own cache)
mkdir -p "$OUT"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
mos-server --rounds 1 --base "$BASE" --port "$PORT" --out "$OUT/server" --state-dir "$STATE/server" \
  > "$OUT/server.log" 2>&1 &
pids+=($!)
for name in alice bob; do
  mos-client --concept "$repo/data/$name" --base "$BASE" --server "127.0.0.1:$PORT" ${STEPS:+--steps "$STEPS"} \
    --out "$OUT/$name" > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
echo "demo: server + alice + bob started on base $BASE (logs in $OUT/*.log); each client tunes its concept" \
  "(steps: ${STEPS:-as the base recipe says}), then three fusion stages"
tail -n 0 -F "$OUT/server.log" &
tailer=$!
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
kill "$tailer" 2>/dev/null || true
pids=()
if [ "$status" -ne 0 ]; then
  echo "demo: a party failed — see $OUT/server.log, $OUT/alice.log, $OUT/bob.log" >&2
  exit 1
fi

# The world base ships a layout adapter: one object asked for in each half, and a picture twice as wide as the
# base's, so each half is the size the concepts were tuned at (docs/world.md)
fill=()
if [ "$BASE" = world ]; then fill=(--fill-boxes --size 128x64); fi
mos sample --base "$BASE" --adapter "$OUT/server/round-1" \
  --prompt "a <alice> on the left and a <bob> on the right" \
  --region "a <alice>||0,0,0.5,1" --region "a <bob>||0.5,0,1,1" "${fill[@]}" --seed 1 --out "$OUT/together.png"
cmp -s "$OUT/server/round-1/adapter.safetensors" "$OUT/alice/adapter.safetensors" \
  && cmp -s "$OUT/server/round-1/adapter.safetensors" "$OUT/bob/adapter.safetensors" \
  || { echo "demo: the parties hold different fused adapters" >&2; exit 1; }
echo
echo "fused model:      $OUT/server/round-1/adapter.safetensors  (report: $OUT/server/round-1/fusion.json)"
echo "diffusers folder: $OUT/alice/pipeline"
echo "together:         $OUT/together.png  (boxes: $OUT/together_layout.png)"
