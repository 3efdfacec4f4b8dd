#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite against the installed package, from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
repo=$(pwd)
cd "$(mktemp -d)"
python -m pytest -q -p no:cacheprovider --rootdir "$repo" -c "$repo/pyproject.toml" "$repo/tests" "$@"
