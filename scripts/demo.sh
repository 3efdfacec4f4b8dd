#!/usr/bin/env bash
# The main job on a fresh machine: set up, then one federated round on this machine — a server and two clients
# (alice, bob) on the embedded toy-world base — ending with the fused model and a picture of both concepts
# together, each in its own half (scripts/demo_round.sh).
#   BASE=tiny STEPS=150 bash scripts/demo.sh   (BASE: the base, default world; STEPS: tuning steps per client,
#                                              default the base's recipe; tiny has random weights: it draws noise)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=mos-out STATE=mos-state bash scripts/demo_round.sh
