"""Killing a fine-tuning run part-way and resuming it ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from medssl_kit.train.checkpoint import load_checkpoint
from medssl_kit.train.transfer import read_transferable

STEPS = 80


def _command(manifest, out, *extra):
    return [
        sys.executable, "-m", "medssl_kit", "finetune", "--manifest", str(manifest),
        "--profile", "smoke", "--labeled", "2", "--steps", str(STEPS), "--out", str(out),
        "--set", "checkpoint_every=5", "--set", "val_every=20", "--set", "patience=1000",
        "--set", "batch_size=2", *extra,
    ]  # fmt: skip


def _losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_kill_and_resume_equals_uninterrupted(tiny_phantom, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_command(tiny_phantom, full), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(
        _command(tiny_phantom, killed), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "checkpoint.pt").exists() and len(_losses(killed)) >= 12:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    step = load_checkpoint(killed / "checkpoint.pt")["state"]["step"]
    assert 0 < step < STEPS, "the run was not killed part-way"
    assert not (killed / "results.csv").exists()

    done = subprocess.run(
        _command(tiny_phantom, killed, "--resume"), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    a = read_transferable(full)["state_dict"]
    b = read_transferable(killed)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(killed) == _losses(full)  # the log has no gap and no duplicate
    assert (killed / "results.csv").read_text() == (full / "results.csv").read_text()
