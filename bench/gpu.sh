#!/usr/bin/env bash
# The GPU check (issue 22), at most 8 minutes on one GPU; JSON out. With CUDA it measures on sd15-random at 512 px:
#   step      an ED-LoRA step against a plain LoRA step: time and peak memory     (bench/tune_step.py)
#   stats     a client's statistics capture, per fusion stage: time, peak memory  (bench/stats_capture.py)
#   regional  regional sampling with 1/2/4 regions against plain sampling         (bench/regional.py)
#   round     one federated round, mos-server + two mos-clients sharing the GPU   (bench/many_clients.py --ns 2)
# Without CUDA, or with --quick, the same parts run on the tiny base on the CPU at the smallest settings, so the
# script cannot rot (tests/test_bench.py runs it that way). Each part has its own time limit; a part that fails
# or runs out of time is recorded as such and the others still run; the exit status is non-zero if any failed.
#
#   bash bench/gpu.sh [--quick] [OUT_DIR]        (default OUT_DIR: bench/results/gpu)
#   PARTS="step stats" bash bench/gpu.sh         (a subset of: step stats regional round)
#   PYTHON=/path/to/python bash bench/gpu.sh     (default: python; the package must be installed there)
#   LIMITS="step:60 stats:50 regional:50 round:150" bash bench/gpu.sh   (each part's time limit in seconds)
# Writes OUT_DIR/<part>.json, OUT_DIR/<part>.log and OUT_DIR/gpu.json (every part's JSON and a summary).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export TRANSFORMERS_VERBOSITY=error FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
PARTS=${PARTS:-step stats regional round}
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"

if [ "$quick" = 0 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  mode=gpu
  # sd15-random is built by the first part (20-30 s, 4 GB under MOS_HOME/bases); every later process reads it back.
  step=(--base sd15-random --device cuda --resolution 512 --steps 10 --warmup 3)
  stats=(--base sd15-random --device cuda --sample-steps 20 --reps 2)
  regional=(--base sd15-random --device cuda --size 512x512 --steps 20 --reps 3)
  round=(--ns 2 --base sd15-random --device cuda --threads 4 --tune-steps 2 --sample-steps 20)
  # 480 s in all (8 minutes with the merge). On the H200 step, stats and regional took 192 s together when each
  # built sd15-random (~30 s); reading it back, 40 s of their limits go to the round, which ran out at 200 s.
  limits=(step:100 stats:70 regional:70 round:240)
else
  mode=cpu-tiny
  export OMP_NUM_THREADS=1
  step=(--base tiny --device cpu --threads 1 --steps 2 --warmup 1)
  stats=(--base tiny --device cpu --sample-steps 2 --reps 1)
  regional=(--base tiny --device cpu --steps 2 --reps 1)
  round=(--ns 2 --base tiny --device cpu --tune-steps 2 --sample-steps 2)
  limits=(step:120 stats:60 regional:60 round:300)
fi
if [ -n "${LIMITS:-}" ]; then read -ra limits <<< "$LIMITS"; fi
limit() { for l in "${limits[@]}"; do [ "${l%%:*}" = "$1" ] && echo "${l##*:}"; done; }

status=0
declare -A rc
t0=$(date +%s)
for part in $PARTS; do
  case $part in
    step) cmd=("$PY" bench/tune_step.py "${step[@]}" --out "$OUT/step.json") ;;
    stats) cmd=("$PY" bench/stats_capture.py "${stats[@]}" --out "$OUT/stats.json") ;;
    regional) cmd=("$PY" bench/regional.py "${regional[@]}" --out "$OUT/regional.json") ;;
    round) cmd=("$PY" bench/many_clients.py "${round[@]}" --out "$OUT/round.json") ;;
    *) echo "gpu.sh: unknown part $part (step stats regional round)" >&2; exit 2 ;;
  esac
  echo "gpu.sh [$mode] $part: ${cmd[*]} (limit $(limit "$part") s)"
  s=$(date +%s)
  timeout --kill-after=10 "$(limit "$part")" "${cmd[@]}" > "$OUT/$part.log" 2>&1
  rc[$part]=$?
  echo "gpu.sh [$mode] $part: exit ${rc[$part]} after $(( $(date +%s) - s )) s (log: $OUT/$part.log)"
  if [ "${rc[$part]}" -ne 0 ]; then status=1; tail -n 20 "$OUT/$part.log" >&2; fi
  if [ "$part" = round ] && [ "${rc[$part]}" -ne 0 ]; then
    # the parties' own logs are in the round's temporary folder, which a stopped round leaves behind
    work=$(ls -dt "${TMPDIR:-/tmp}"/mos-many-*/ 2>/dev/null | head -n 1)
    if [ -n "$work" ] && [ -d "$work/logs" ]; then cp -r "$work/logs" "$OUT/round-logs"; fi
  fi
done

codes=""
for part in $PARTS; do codes="$codes $part=${rc[$part]}"; done
"$PY" - "$OUT" "$mode" "$(( $(date +%s) - t0 ))" $codes <<'EOF'
import json
import sys
from pathlib import Path

from mos.shared.files import write_json

out, mode, total = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
codes = dict(a.split("=") for a in sys.argv[4:])
parts = {p: json.loads((out / f"{p}.json").read_text()) if rc == "0" and (out / f"{p}.json").is_file() else None
         for p, rc in codes.items()}
summary = {}
if parts.get("step"):
    s = parts["step"]
    summary["step"] = {"ms": {v: m["median"] for v, m in s["ms_per_step"].items()},
                       "ratio_edlora_over_lora": s["ratio_edlora_over_lora"],
                       "ratio_edlora_masked_over_lora": s["ratio_edlora_masked_over_lora"],
                       "peak_gpu_memory_gib": s["peak_gpu_memory_gib"]}
if parts.get("stats"):
    summary["stats"] = {k: {"s": v["median_s"], "peak_gpu_memory_gib": v["peak_gpu_memory_gib"]}
                        for k, v in parts["stats"]["stages"].items()}
if parts.get("regional"):
    summary["regional"] = {f"{n}_regions_wall_ratio": r["wall_ratio_paired"]
                           for n, r in parts["regional"]["regions"].items() if n != "0"}
    summary["regional"]["plain_wall_s"] = parts["regional"]["regions"]["0"]["wall_median_s"]
if parts.get("round"):
    (r,) = parts["round"]["rounds"]
    summary["round"] = {"finished": r["round_finished"], "same_adapter": r["same_adapter"].get("all_equal"),
                        "wall_s": r["wall_s"], "stage_s": {k: v["seconds"] for k, v in r["stages"].items()},
                        "server_peak_rss_mib": r["server_peak_rss_mib"]}
result = {"bench": "gpu", "mode": mode, "total_s": total, "exit_codes": {p: int(c) for p, c in codes.items()},
          "summary": summary, "parts": parts}
write_json(out / "gpu.json", result)
print(json.dumps({k: result[k] for k in ("mode", "total_s", "exit_codes", "summary")}, indent=2))
print(f"wrote {out / 'gpu.json'}")
EOF
exit $status
