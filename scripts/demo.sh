#!/usr/bin/env bash
# The main job on a fresh machine: set up, then one federated round on this machine — a server and two clients
# (alice, bob) on the embedded tiny base — ending with the fused model and a picture of both concepts together,
# each in its own half.
#   STEPS=150 BASE=tiny bash scripts/demo.sh   (tuning steps per client; BASE=world: the pretrained toy-world base,
#                                              which draws simple prompts but is not yet good to tune: docs/world.md)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRANSFORMERS_VERBOSITY=error FLWR_TELEMETRY_ENABLED=0 OMP_NUM_THREADS=1
STEPS=${STEPS:-150}
BASE=${BASE:-tiny}
OUT=mos-out
rm -rf "$OUT" mos-state          # a fresh round each time (clients keep their tuned adapters in their own cache)
mkdir -p "$OUT"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
mos-server --rounds 1 --base "$BASE" --out "$OUT/server" --state-dir mos-state/server > "$OUT/server.log" 2>&1 &
pids+=($!)
mos-client --concept data/alice --base "$BASE" --steps "$STEPS" --out "$OUT/alice" > "$OUT/alice.log" 2>&1 &
pids+=($!)
mos-client --concept data/bob --base "$BASE" --steps "$STEPS" --out "$OUT/bob" > "$OUT/bob.log" 2>&1 &
pids+=($!)
echo "demo: server + alice + bob started (logs in $OUT/*.log); tuning $STEPS steps each, then three fusion stages"
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

mos sample --base "$BASE" --adapter "$OUT/server/round-1" \
  --prompt "a <alice> on the left and a <bob> on the right" \
  --region "a <alice>||0,0,0.5,1" --region "a <bob>||0.5,0,1,1" --seed 1 --out "$OUT/together.png"
cmp -s "$OUT/server/round-1/adapter.safetensors" "$OUT/alice/adapter.safetensors" \
  && cmp -s "$OUT/server/round-1/adapter.safetensors" "$OUT/bob/adapter.safetensors" \
  || { echo "demo: the parties hold different fused adapters" >&2; exit 1; }
echo
echo "fused model:      $OUT/server/round-1/adapter.safetensors  (report: $OUT/server/round-1/fusion.json)"
echo "diffusers folder: $OUT/alice/pipeline"
echo "together:         $OUT/together.png  (boxes: $OUT/together_layout.png)"
