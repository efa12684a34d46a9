"""The same vk.fit code under torchrun with 2 CPU processes (gloo): it trains, and it equals one process.

Two processes with batch 8 each see, step for step, the same 16 images as one process with batch 16 (each
process takes every other index of the epoch's order), and DDP averages their gradients, so the weights agree
up to the order of floating-point sums (measured 1.9e-5 after 8 AdamW steps; asserted 1e-4).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")
ROOT = Path(__file__).resolve().parents[2]


def _launch(args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=True)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    two = _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                   str(tmp_path / "two"), "8"], tmp_path / "two")
    one = _launch([str(SCRIPT), str(tmp_path / "one"), "16"], tmp_path / "one")
    assert (two["world"], one["world"]) == (2, 1)
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]]
    worst = max((two["state"][k] - one["state"][k]).abs().max().item() for k in one["state"])
    assert worst < 1e-4, f"2-process weights differ from 1-process weights by {worst}"
    assert abs(two["history"][-1]["val_loss"] - one["history"][-1]["val_loss"]) < 1e-4


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    # issue 12.6: rank 1's loss turns NaN at its second batch; rank 0's stays finite. Without agreement, rank 0
    # would enter the gradient all-reduce alone and hang (or be killed by the launcher without a message).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "nan"
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(SCRIPT), str(out), "4", "nan"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the ranks hung after one rank's NaN loss: {str(err.stderr)[-2000:]}") from None
    assert done.returncode != 0
    stopped = {p.name: p.read_text() for p in out.glob("stopped-*.txt")}
    assert set(stopped) == {"stopped-0.txt", "stopped-1.txt"}, (stopped, done.stderr[-3000:])
    assert "on this process (rank 1)" in stopped["stopped-1.txt"], stopped
    assert "rank 0 stops too" in stopped["stopped-0.txt"], stopped
    assert "at step 2 (epoch 1, batch 2)" in stopped["stopped-0.txt"], stopped
