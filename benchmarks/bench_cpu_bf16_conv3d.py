"""Benchmark: bfloat16 3D convolutions on the CPU, as PyTorch gives them and as the training loops
run them (:class:`medssl_kit.train.distributed.Depth2Conv3dInFloat32`, a depth-2 ``conv3d`` in
float32), in one run:

1. accuracy — the relative error of a 3×3×3 ``conv3d``'s weight gradient against float32, by
   input depth, worst of 4 calls (oneDNN's bfloat16 kernel is wrong at depth 2, torch 2.13);
2. speed — one forward + backward of a 3D backbone at the cpu profile's patch (batch 2,
   32×64×64) in float32, plain bfloat16 autocast and the loops' bfloat16, alternating, the best
   of 2 rounds × 3 steps after a warm-up; ratios against float32.

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_bf16_conv3d.py
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from medssl_kit.models import build_backbone
from medssl_kit.train.distributed import native_cpu_bfloat16, precision

CPU = torch.device("cpu")
CONTEXTS: dict[str, Callable[[], AbstractContextManager]] = {
    "float32": lambda: torch.autocast("cpu", enabled=False),
    "bf16 plain": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "bf16 loops": lambda: precision(CPU, amp=True).autocast(CPU),
}


def gradient_error(context: Callable[[], AbstractContextManager], depth: int) -> float:
    """Worst relative error of a 64-channel ``conv3d``'s weight gradient over 4 calls."""
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, depth, 8, 8)
    conv(x).square().mean().backward()
    reference = conv.weight.grad.clone()
    worst = 0.0
    for _ in range(4):
        conv.zero_grad()
        with context():
            y = conv(x)
        y.float().square().mean().backward()
        worst = max(worst, ((conv.weight.grad - reference).norm() / reference.norm()).item())
    return worst


def step_seconds(net: nn.Module, context: Callable[[], AbstractContextManager]) -> float:
    """Mean seconds of 3 forward + backward steps (one untimed before them)."""
    x = torch.randn(2, 1, 32, 64, 64)

    def step() -> None:
        net.zero_grad()
        with context():
            y = net(x)
        y.float().square().mean().backward()

    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    return (time.perf_counter() - start) / 3


def main() -> None:
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, native bfloat16: {native_cpu_bfloat16()}"
    )
    print("weight-gradient relative error of a 3x3x3 conv3d (64 -> 64, batch 2) by input depth")
    for depth in (1, 2, 3, 4):
        errors = {name: gradient_error(context, depth) for name, context in CONTEXTS.items()}
        print(f"  depth {depth}: " + "; ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    torch.manual_seed(0)
    networks = {
        "unet 16..256 (5 levels)": build_backbone("unet", 3, 1, 4, channels=[16, 32, 64, 128, 256]),
        "fpn (6 levels, base 16)": build_backbone("fpn", 3, 1, 4),
    }
    print("seconds per forward + backward, batch 2 of 32x64x64 (best of 2 rounds)")
    for label, net in networks.items():
        times: dict[str, list[float]] = {name: [] for name in CONTEXTS}
        for _ in range(2):
            for name, context in CONTEXTS.items():
                times[name].append(step_seconds(net, context))
        base = min(times["float32"])
        print(
            f"  {label}: "
            + "; ".join(f"{k} {min(v):.3f} s (x{min(v) / base:.2f})" for k, v in times.items())
        )


if __name__ == "__main__":
    main()
