"""Benchmark: seconds per pre-training step and peak memory, for several configurations in one run.

Each configuration is ``METHOD[:DIMS][:key=value,...]`` (method settings or loop settings), run for
``--steps`` steps at ``--profile`` on the manifest; the first ``--warmup`` steps are not timed.
Ratios are given against the first configuration, so that a comparison (e.g. pixel_global with
and without its MC-dropout uncertainty) is measured on the same machine in the same run:

    OMP_NUM_THREADS=2 python benchmarks/bench_pretrain.py --manifest data/phantom \\
        pixel_global:2:uncertainty=false pixel_global:2

Peak memory is the resident-set high-water mark of a fresh subprocess per configuration. "s/step"
times the optimisation (forward, backward, step); "wall s/step" is the whole run over its steps,
building the batches (view sampling, augmentation) included, which is what a time budget counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time


def _child(spec: str, manifest: str, profile: str, steps: int, warmup: int) -> dict:
    from medssl_kit.train.pretrain import PretrainConfig, run_pretraining

    method, _, rest = spec.partition(":")
    dims, _, settings = rest.partition(":")
    # Commas separate settings, except inside brackets: crop_size=[64,64],mc_samples=8
    overrides = dict(kv.split("=", 1) for kv in re.split(r",(?![^\[]*\])", settings) if kv)
    parsed = {k: json.loads(v) if v not in ("", None) else v for k, v in overrides.items()}
    cfg = PretrainConfig(
        method=method, profile=profile, dims=int(dims) if dims else None, steps=steps
    )
    loop = set(cfg.__dataclass_fields__)
    for key, value in parsed.items():
        if key in loop:
            setattr(cfg, key, value)
        else:
            cfg.method_cfg[key] = value
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        started = time.perf_counter()
        result = run_pretraining(cfg, manifest, f"{tmp}/run", progress=False)
        wall = (time.perf_counter() - started) / steps
    times = sorted(r["seconds"] for r in result.history[warmup:])
    return {
        "config": spec,
        "median_s_per_step": times[len(times) // 2],
        "wall_s_per_step": wall,
        "steps_timed": len(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", metavar="METHOD[:DIMS][:k=v,...]")
    parser.add_argument("--manifest", default="data/phantom")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.configs[0], args.manifest, args.profile, args.steps,
                                args.warmup)))  # fmt: skip
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, profile {args.profile}, "
          f"{args.steps} steps ({args.warmup} untimed)")  # fmt: skip
    rows = []
    for spec in args.configs:
        out = subprocess.run(
            [sys.executable, __file__, "--child", spec, "--manifest", args.manifest,
             "--profile", args.profile, "--steps", str(args.steps), "--warmup", str(args.warmup)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"{spec}: {out.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["median_s_per_step"]
    print("| configuration | s/step (median) | ratio | wall s/step | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["median_s_per_step"] / base
        print(f"| `{r['config']}` | {r['median_s_per_step']:.3f} | {ratio:.2f} | "
              f"{r['wall_s_per_step']:.3f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
