#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite against the installed package, from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
repo=$(pwd)
cd "$(mktemp -d)"
# two test processes (pytest-xdist): most tests are single-threaded, so a 2-core machine runs two at once;
# MOS_TEST_WORKERS=0 runs them in this process, one after another
python -m pytest -q -p no:cacheprovider -n "${MOS_TEST_WORKERS:-2}" --rootdir "$repo" -c "$repo/pyproject.toml" \
    "$repo/tests" "$@"
