#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run what exists of the pipeline on the embedded tiny base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRANSFORMERS_VERBOSITY=error FLWR_TELEMETRY_ENABLED=0
mos base info --base tiny
echo
echo "demo: tuning, fusion and the federated service are not built yet — nothing more to run."
exit 1
