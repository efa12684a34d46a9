#!/usr/bin/env bash
# Create .venv and install vitkit with the exact versions of constraints.txt (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
