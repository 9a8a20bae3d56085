"""Benchmark: pre-training throughput of one process against several (DDP) at equal global batch.

For each configuration ``METHOD[:DIMS]`` the same pre-training run (``--profile``'s batch, the
global batch in both cases) is made with ``medssl pretrain`` as

- 1 process with ``--threads`` intra-op threads (``OMP_NUM_THREADS``), and
- ``--nproc`` processes (``medssl pretrain --nproc N``: torchrun's launcher, gloo, DDP) with
  ``--threads / N`` threads each,

alternately, ``--repeats`` times, so that both see the same machine load; the ratio is taken per
repeat. A third run, 1 process with ``--threads / N`` threads, is the control: on a machine busy
with other work, the ``--threads`` OpenMP threads of one process can lose more to waiting for
each other than they gain, and the control shows how much of a difference is that. Samples per
second count the global batch over the loop's wall time (batches built, steps, logging; process
start and data loading excluded), from the run's ``summary.json``; "step s" is the median time
of forward, backward and optimiser step alone (rank 0's in DDP).
The machine's load average is printed with every run, since a busy machine skews both::

    python benchmarks/bench_ddp.py --manifest data/phantom --profile cpu mocov2:2 models_genesis:3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(
    method: str, dims: str, args: argparse.Namespace, nproc: int, out: Path, threads: int
) -> dict:
    command = [
        sys.executable, "-m", "medssl_kit", "pretrain", "--method", method, "--manifest",
        args.manifest, "--profile", args.profile, "--out", str(out), "--steps", str(args.steps),
        "--device", "cpu", "--set", f"checkpoint_every={args.steps}", "--nproc", str(nproc),
    ]  # fmt: skip
    if dims:
        command += ["--dims", dims]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{method}:{dims} x{nproc}: {done.stderr.strip().splitlines()[-1]}")
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())["config"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_times = sorted(r["seconds"] for r in records[args.warmup :])
    return {
        "batch": config["batch_size"],
        "samples_per_s": config["batch_size"] * summary["steps"] / summary["wall_time_s"],
        "step_s": step_times[len(step_times) // 2],
        "threads": threads,
        "load": (load + os.getloadavg()[0]) / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", metavar="METHOD[:DIMS]")
    parser.add_argument("--manifest", default="data/phantom")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the step time")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the machine to use")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, profile "
        f"{args.profile}, {args.steps} steps; 1 process x {args.threads} threads against "
        f"{args.nproc} processes x {max(1, args.threads // args.nproc)} thread(s)"
    )
    few = max(1, args.threads // args.nproc)
    print(f"| method | run | global batch | samples/s 1 proc x {args.threads} | samples/s "
          f"{args.nproc} proc x {few} | ratio | samples/s 1 proc x {few} (control) "
          "| step s (1 proc / DDP / control) | load avg (1 proc / DDP / control) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="medssl-bench-ddp-") as tmp:
        for spec in args.configs:
            method, _, dims = spec.partition(":")
            ratios = []
            for repeat in range(args.repeats):
                base = Path(tmp) / f"{spec}-{repeat}"
                one = _run(method, dims, args, 1, base / "one", args.threads)
                many = _run(method, dims, args, args.nproc, base / "ddp", few)
                control = _run(method, dims, args, 1, base / "control", few)
                ratios.append(many["samples_per_s"] / one["samples_per_s"])
                runs = (one, many, control)
                steps = " / ".join(f"{r['step_s']:.3f}" for r in runs)
                loads = " / ".join(f"{r['load']:.1f}" for r in runs)
                print(
                    f"| `{spec}` | {repeat + 1} | {one['batch']} | {one['samples_per_s']:.2f} | "
                    f"{many['samples_per_s']:.2f} | {ratios[-1]:.2f} | "
                    f"{control['samples_per_s']:.2f} | {steps} | {loads} |",
                    flush=True,
                )
            median = statistics.median(ratios)
            print(f"| `{spec}` | median ratio | | | | {median:.2f} | | | |")


if __name__ == "__main__":
    main()
