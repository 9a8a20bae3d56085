"""Benchmark: phantom generation speed (DESIGN §2.1 target: 40 cases of 48x128x128 in < 60 s on
2 cores).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_phantom.py [--cases 40] [--workers 2]``.
Writes into a temporary folder (removed afterwards) and prints wall-clock seconds and cases/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from medssl_kit.data.phantom import DEFAULT_SHAPE, make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modality", choices=["ct", "mri"], default="ct")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medssl-bench-phantom-") as tmp:
        start = time.perf_counter()
        make_phantom(
            tmp,
            cases=args.cases,
            shape=tuple(args.shape),
            modality=args.modality,
            workers=args.workers,
        )
        seconds = time.perf_counter() - start
    shape = "x".join(str(s) for s in args.shape)
    print(
        f"phantom {args.modality}: {args.cases} cases of {shape} with {args.workers} workers:"
        f" {seconds:.1f} s ({args.cases / seconds:.2f} cases/s)"
        f" [{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs]"
    )


if __name__ == "__main__":
    main()
