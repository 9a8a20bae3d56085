"""Benchmark: how far pixel_global's uncertainty ``U`` moves when its MC-dropout estimate is made
cheaper (dropout in fewer decoder levels, fewer passes), on a trained run's teacher.

``U`` (eq. 6) is computed on test slices by the run's teacher in eval mode twice with the
reference estimator (dropout in every decoder level, 20 passes; masks seeded 0 and 1: the
estimator's own noise), then once per configuration ``LEVELS:SAMPLES`` (``all`` for every level;
masks seeded 2). Reported per configuration, over the body's pixels (the image above its
minimum): Pearson's r with the reference, mean |ΔU| and mean U:

    python benchmarks/bench_mc_uncertainty.py runs/pixel_global --manifest data/phantom \\
        all:20 1:20 1:8 all:8

The weights are the run's; only parameter-free dropout modules move, so every configuration
reads the same network.
"""

from __future__ import annotations

import argparse
import time

import torch

from medssl_kit.data.datasets import load_volumes
from medssl_kit.data.manifest import load_manifest
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.pretrain import load_method


def uncertainty(method, images: torch.Tensor, levels: int | None, samples: int, seed: int):
    """``U`` of ``images`` with dropout in the last ``levels`` decoder blocks, ``samples``
    passes, and the seconds it took."""
    teacher = method.teacher["backbone"]
    rebuilt = build_backbone(**{**teacher.config, "dropout_levels": levels})
    rebuilt.load_state_dict(teacher.state_dict())
    method.teacher["backbone"] = rebuilt.eval()
    method.cfg["mc_samples"] = samples
    started = time.perf_counter()
    u = method.uncertainty_map(images, seed=seed)
    return u, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a pixel_global pre-training run folder")
    parser.add_argument("configs", nargs="+", metavar="LEVELS:SAMPLES")
    parser.add_argument("--manifest", default="data/phantom")
    parser.add_argument("--cases", type=int, default=2, help="test volumes to read")
    parser.add_argument("--slices", type=int, default=16, help="middle slices per volume")
    args = parser.parse_args()

    method = load_method(args.run)
    teacher = method.teacher["backbone"]
    volumes = load_volumes(load_manifest(args.manifest), ["test"])[: args.cases]
    images = []
    for vol in volumes:
        depth = vol.image.shape[1]
        lo = max(0, depth // 2 - args.slices // 2)
        images.append(vol.image[:, lo : lo + args.slices].movedim(1, 0))
    images = torch.cat(images)
    body = images[:, 0] > images.amin()

    reference, ref_s = uncertainty(method, images, teacher.config.get("dropout_levels"), 20, 0)
    rows = [("reference, masks seeded 1", *uncertainty(method, images, None, 20, 1))]
    for spec in args.configs:
        levels, _, samples = spec.partition(":")
        level_arg = None if levels == "all" else int(levels)
        rows.append((spec, *uncertainty(method, images, level_arg, int(samples), 2)))

    ref = reference[body]
    print(f"# {args.run}: {len(images)} test slices of {list(images.shape[2:])}, U on the body")
    print(f"# reference (dropout in every decoder level, 20 passes): mean U {ref.mean():.4f}, "
          f"{ref_s:.2f} s")  # fmt: skip
    print("| configuration (levels:passes) | Pearson r with reference | mean abs dU | mean U | s |")
    print("|---|---|---|---|---|")
    for name, u, seconds in rows:
        own = u[body]
        r = torch.corrcoef(torch.stack([own, ref]))[0, 1].item()
        diff = (own - ref).abs().mean().item()
        print(f"| {name} | {r:.3f} | {diff:.4f} | {own.mean():.4f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
