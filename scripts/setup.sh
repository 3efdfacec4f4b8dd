#!/usr/bin/env bash
# Make .venv (Python 3.11) with the pinned stack and this project installed (non-editable, as users get it).
# torch goes first and exactly: with no torch present, a plain `torch` requirement pulls a multi-GB CUDA build;
# 2.13.0 is the CPU wheel here. Users with a GPU install their own CUDA torch before this (the range admits it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c 'import torch' 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
python -c 'import mos.shared.sd.base, mos.client, mos.server' || { echo "setup: the package did not install" >&2; exit 1; }
