#!/usr/bin/env bash
# Create .venv and install vitkit with the exact versions of constraints.txt (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
# pip.conf on the project machines names local wheel folders that may be absent: drop that noise only
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q -c constraints.txt torch torchvision
# setuptools warns on every editable install ("Please be careful with folders in your working directory with the
# same name as your package"): vitkit/ is that folder, on purpose. Silence that one warning (by its message) only.
PYTHONWARNINGS="ignore:Editable installation" quiet .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,ray,compress,distill,volume]"
# lightly and torchattacks declare dependencies vitkit does not use (pytorch-lightning, requests 2.25): skip them
quiet .venv/bin/python -m pip install -q -c constraints.txt lightning-utilities
quiet .venv/bin/python -m pip install -q -c constraints.txt --no-deps lightly torchattacks
quiet .venv/bin/python -m pip install -q -c constraints.txt transformers  # the [hf] extra: CvT's test oracle
