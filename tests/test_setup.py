"""`scripts/setup.sh` keeps the README's two commands quiet: its editable install prints no setuptools banner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = "is ignored: it is neither a file nor a directory"  # pip.conf wheel folders absent here (setup.sh drops it)


@pytest.mark.slow
def test_setup_editable_install_prints_no_banner(tmp_path):
    line = next(x for x in (ROOT / "scripts" / "setup.sh").read_text().splitlines() if " -e " in x and "pip" in x)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the pip that setup.sh installs (--upgrade pip): a recent one, which shows build-backend warnings
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "pip"], check=True,
                   capture_output=True, timeout=300)
    command = line.replace("quiet ", "").replace(".venv/bin/python", str(python)).replace(" -e ", " --no-deps -e ")
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [x for x in (done.stdout + done.stderr).splitlines() if x.strip() and NOISE not in x]
    assert printed == [], "\n".join(printed)
