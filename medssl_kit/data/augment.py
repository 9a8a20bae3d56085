"""Intensity and local corruption transforms shared by the pre-training methods.

Every transform is a pure function of a channel-first tensor ``x`` of shape ``[C, *S]``
(``S = (H, W)`` in 2D, ``(D, H, W)`` in 3D) and returns a new tensor of the same shape and dtype;
the input is never modified. Randomness comes only from the ``torch.Generator`` passed in (never the
global RNG), so the same generator state gives the same output. Generators are CPU generators; draws
are made on the CPU and moved to ``x.device``.

Intensities are in the units of ``x``. Transforms that say "[0, 1] data" assume the windowed and
scaled images of DESIGN §2.3 (CT: HU window mapped to [0, 1]; MRI: percentile clip mapped to
[0, 1]).
Sizes and positions are in voxels, ordered like ``S``.

Two families:

- intensity transforms that never move a voxel (:func:`gaussian_noise`, :func:`gaussian_blur`,
  :func:`gamma`, :func:`contrast`, :func:`brightness`, :func:`nonlinear_intensity`); the view
  sampler (:mod:`medssl_kit.data.views`) builds its intensity augmentation from these;
- local corruptions used by restoration pretext tasks (:func:`local_pixel_shuffle`,
  :func:`block_pixel_shuffle`, :func:`inpaint`, :func:`outpaint`, :func:`cutout`, :func:`swap`),
  after Models Genesis (Zhou et al., 2021), the hierarchical dense SSL paper and PCRLv2's 3D
  "swap" (after TorchIO's ``RandomSwap``). Each draws its boxes first from the generator (with
  :func:`random_boxes`; :func:`block_pixel_shuffle` draws all starts at once), so a generator in
  the same state reproduces the boxes (tests rely on this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering
from torch import Tensor

__all__ = [
    "Box",
    "block_pixel_shuffle",
    "brightness",
    "contrast",
    "cutout",
    "gamma",
    "gaussian_blur",
    "gaussian_noise",
    "inpaint",
    "local_pixel_shuffle",
    "nonlinear_intensity",
    "outpaint",
    "randint",
    "random_boxes",
    "swap",
    "uniform",
]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of voxels: indices ``start[i] <= idx[i] < start[i] + size[i]``.

    ``start`` and ``size`` are integers in voxel index units, ordered like the spatial shape
    ((y, x) in 2D, (z, y, x) in 3D).
    """

    start: tuple[int, ...]
    size: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.start) != len(self.size):
            raise ValueError(f"Box start {self.start} and size {self.size} differ in length")
        if any(s < 1 for s in self.size):
            raise ValueError(f"Box sizes must be >= 1 voxel, got {self.size}")

    @property
    def stop(self) -> tuple[int, ...]:
        """Exclusive end index per axis."""
        return tuple(a + s for a, s in zip(self.start, self.size, strict=True))

    @property
    def volume(self) -> int:
        """Number of voxels in the box."""
        return math.prod(self.size)

    @property
    def slices(self) -> tuple[slice, ...]:
        """Index the box's spatial region: ``x[(slice(None), *box.slices)]`` for ``[C, *S]``."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    def intersection_volume(self, other: Box) -> int:
        """Number of voxels shared with ``other``."""
        overlap = 1
        for a0, a1, b0, b1 in zip(self.start, self.stop, other.start, other.stop, strict=True):
            overlap *= max(0, min(a1, b1) - max(a0, b0))
        return overlap

    def iou(self, other: Box) -> float:
        """Intersection over union of the two voxel sets, in [0, 1]."""
        inter = self.intersection_volume(other)
        return inter / (self.volume + other.volume - inter)

    def bounding_box(self, other: Box) -> Box:
        """The minimum box containing both boxes."""
        lo = tuple(min(a, b) for a, b in zip(self.start, other.start, strict=True))
        hi = tuple(max(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        return Box(lo, tuple(h - low for h, low in zip(hi, lo, strict=True)))

    def contains(self, other: Box) -> bool:
        """True when every voxel of ``other`` lies in this box."""
        return all(
            a0 <= b0 and b1 <= a1
            for a0, a1, b0, b1 in zip(self.start, self.stop, other.start, other.stop, strict=True)
        )


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (both inclusive), drawn from ``generator``."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """Uniform float in ``[low, high)`` drawn from ``generator`` (one draw, even if low == high)."""
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs {ndim} entries (one per spatial axis), got {values}")
    return values


def random_boxes(
    shape: Sequence[int],
    generator: torch.Generator,
    n: int,
    min_size: int | Sequence[int],
    max_size: int | Sequence[int],
) -> list[Box]:
    """Draw ``n`` boxes that lie inside a spatial ``shape``.

    Per box and axis, the size is uniform in ``[min_size, max_size]`` voxels (both clamped to
    ``[1, shape[i]]``), then the start is uniform over the positions that keep the box inside.
    Draw order (axis sizes, then axis starts, box by box) is part of the contract.
    """
    shape = tuple(int(s) for s in shape)
    lo = _per_axis(min_size, len(shape), "min_size")
    hi = _per_axis(max_size, len(shape), "max_size")
    boxes = []
    for _ in range(n):
        size = []
        for n_i, a, b in zip(shape, lo, hi, strict=True):
            a_c = min(max(a, 1), n_i)
            size.append(randint(generator, a_c, min(max(b, a_c), n_i)))
        start = tuple(randint(generator, 0, n_i - s) for n_i, s in zip(shape, size, strict=True))
        boxes.append(Box(start, tuple(size)))
    return boxes


def _fraction_sizes(
    shape: Sequence[int], fraction: tuple[float, float]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-axis ``(min_size, max_size)`` in voxels from a fraction range of each axis' length."""
    lo = tuple(max(1, int(round(n * fraction[0]))) for n in shape)
    hi = tuple(max(1, int(round(n * fraction[1]))) for n in shape)
    return lo, hi


# --- intensity transforms (never move a voxel) -------------------------------------------------


def gaussian_noise(x: Tensor, generator: torch.Generator, std: float) -> Tensor:
    """Add i.i.d. zero-mean Gaussian noise of standard deviation ``std`` (intensity units)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return x + std * noise.to(x.device)


def gaussian_blur(x: Tensor, sigma: float | Sequence[float]) -> Tensor:
    """Gaussian smoothing with standard deviation ``sigma`` in voxels (one value or one per axis).

    Separable MONAI filter (erf-integrated kernel truncated at 4 sigma, normalised to sum 1),
    each channel independently, borders replicated (no darkening at the image edge). The kernel is
    symmetric, so a blurred structure stays where it was. ``sigma == 0`` on an axis leaves it alone.
    """
    ndim = x.ndim - 1
    sigmas = (float(sigma),) * ndim if isinstance(sigma, (int, float)) else tuple(sigma)
    if len(sigmas) != ndim:
        raise ValueError(f"sigma needs 1 or {ndim} values, got {sigmas}")
    kernels = [
        gaussian_1d(torch.tensor(s), truncated=4.0, approx="erf", normalize=True)
        if s > 0
        else torch.ones(1)
        for s in sigmas
    ]
    return separable_filtering(x[None], kernels, mode="replicate")[0]


def gamma(x: Tensor, value: float) -> Tensor:
    """Gamma correction ``x ** value`` of [0, 1] data; values outside [0, 1] are clipped first.

    ``value < 1`` brightens, ``value > 1`` darkens; the output stays in [0, 1].
    """
    if value <= 0:
        raise ValueError(f"gamma must be > 0, got {value}")
    return x.clamp(0.0, 1.0).pow(value)


def contrast(x: Tensor, factor: float) -> Tensor:
    """Scale deviations from each channel's mean by ``factor``: ``(x - m) * factor + m``.

    ``m`` is the channel mean over the whole tensor, so the mean is preserved and the standard
    deviation is multiplied by ``|factor|``.
    """
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - mean) * factor + mean


def brightness(x: Tensor, shift: float) -> Tensor:
    """Add a constant ``shift`` (intensity units)."""
    return x + shift


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x`` (``xp`` ascending), as np.interp."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def nonlinear_intensity(
    x: Tensor, generator: torch.Generator, invert_prob: float = 0.5, n_points: int = 1000
) -> Tensor:
    """Models Genesis non-linear intensity transform of [0, 1] data by a random Bézier curve.

    A cubic Bézier curve with end points (0, 0) and (1, 1) and two control points uniform in
    [0, 1]^2 is sampled at ``n_points``; its x and y samples are sorted separately, which gives a
    monotone non-decreasing map of [0, 1] onto [0, 1]. With probability ``invert_prob`` the map is
    reversed (decreasing), as in Models Genesis. Input values are clipped to [0, 1]; the output is
    in [0, 1] and every voxel keeps its place (the map is applied pointwise).
    """
    p1x, p1y, p2x, p2y = (uniform(generator, 0.0, 1.0) for _ in range(4))
    invert = uniform(generator, 0.0, 1.0) < invert_prob
    t = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
    xs = torch.sort(b1 * p1x + b2 * p2x + b3).values
    ys = torch.sort(b1 * p1y + b2 * p2y + b3).values
    if invert:
        ys = ys.flip(0)
    out = _interp(x.detach().to("cpu", torch.float64).clamp(0.0, 1.0), xs, ys)
    return out.to(device=x.device, dtype=x.dtype)


def intensity_lookup(x: Tensor, values: Sequence[float]) -> Tensor:
    """Map [0, 1] data through a piecewise-linear lookup table with evenly spaced knots.

    Knot ``k`` of ``K = len(values)`` sits at ``k / (K - 1)`` and maps to ``values[k]``; between
    knots the map is linear. With random ``values`` the map is not monotone, so it changes which
    tissue is brighter than which (the per-class intensity randomisation of SynthSeg, Billot et
    al. 2023, applied to the whole intensity range instead of label maps). Input values are
    clipped to [0, 1]; every voxel keeps its place.
    """
    if len(values) < 2:
        raise ValueError(f"a lookup table needs at least 2 knots, got {len(values)}")
    fp = torch.tensor(values, dtype=torch.float64)
    xp = torch.linspace(0.0, 1.0, fp.numel(), dtype=torch.float64)
    out = _interp(x.detach().to("cpu", torch.float64).clamp(0.0, 1.0), xp, fp)
    return out.to(device=x.device, dtype=x.dtype)


def random_lookup_table(generator: torch.Generator, knots: int) -> tuple[float, ...]:
    """Knot values for :func:`intensity_lookup`, each uniform in [0, 1], drawn in knot order."""
    return tuple(uniform(generator, 0.0, 1.0) for _ in range(int(knots)))


# --- local corruptions --------------------------------------------------------------------------


def local_pixel_shuffle(
    x: Tensor, generator: torch.Generator, n_blocks: int = 1000, max_fraction: float = 0.1
) -> Tensor:
    """Models Genesis local pixel shuffling: permute the voxels inside many small random blocks.

    ``n_blocks`` boxes are drawn with :func:`random_boxes`, each axis from 1 voxel up to
    ``max_fraction`` of the axis length. The blocks are then shuffled one after another, each
    with its own random permutation of its voxel positions; all channels of a voxel move together.
    Each step permutes the current tensor, so the whole result is a permutation of the voxels of
    ``x`` (the multiset of values is preserved) and voxels outside every block are untouched.
    """
    shape = tuple(x.shape[1:])
    max_size = tuple(max(1, int(n * max_fraction)) for n in shape)
    boxes = random_boxes(shape, generator, n_blocks, 1, max_size)
    out = x.clone()
    for box in boxes:
        region = (slice(None), *box.slices)
        block = out[region].reshape(x.shape[0], -1)
        perm = torch.randperm(block.shape[1], generator=generator).to(x.device)
        out[region] = block[:, perm].reshape(out[region].shape)
    return out


def block_pixel_shuffle(
    x: Tensor, generator: torch.Generator, n_blocks: int = 5000, fraction: float = 1 / 20
) -> Tensor:
    """Local pixel shuffling as the hierarchical dense SSL paper's public code does it.

    ``n_blocks`` blocks of exactly ``max(1, ⌊n · fraction⌋)`` voxels along each axis of length
    ``n`` (the public code: 5000 blocks of 1/20 of each side) at uniform random places; each
    block's voxels are read from ``x``, permuted by the block's own random permutation (the
    public code draws one permutation for all blocks) and written back block after block, so
    where blocks overlap the later block's values win (a value may then repeat). All channels
    of a voxel move together; voxels outside every block are untouched, and every voxel's value
    comes from inside a block that holds it. Unlike :func:`local_pixel_shuffle` (Models
    Genesis: block sizes drawn from 1 voxel up), the block size is fixed, so the blocks cover
    the same fraction of any crop; blocks of one voxel change nothing and draw nothing.
    """
    shape = tuple(x.shape[1:])
    size = [max(1, int(n * fraction)) for n in shape]
    block = math.prod(size)
    if block == 1:
        return x.clone()
    dev = generator.device
    starts = torch.stack(
        [
            torch.randint(0, n - s + 1, (n_blocks,), generator=generator, device=dev)
            for n, s in zip(shape, size, strict=True)
        ],
        -1,
    )
    offsets = torch.cartesian_prod(*[torch.arange(s, device=dev) for s in size])
    strides = torch.tensor([math.prod(shape[i + 1 :]) for i in range(len(shape))], device=dev)
    target = ((starts[:, None, :] + offsets.reshape(block, len(shape))) * strides).sum(-1)
    perm = torch.rand(n_blocks, block, generator=generator, device=dev).argsort(1)
    source = target.gather(1, perm).flatten()
    target = target.flatten()
    order = torch.arange(target.numel(), device=dev)
    last = torch.full((math.prod(shape),), -1, device=dev).scatter_reduce(0, target, order, "amax")
    keep = (last[target] == order).to(x.device)
    flat = x.reshape(x.shape[0], -1)
    out = flat.clone()
    out[:, target.to(x.device)[keep]] = flat[:, source.to(x.device)[keep]]
    return out.reshape(x.shape)


def _uniform_noise_like(x: Tensor, generator: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return noise.to(x.device)


def inpaint(
    x: Tensor,
    generator: torch.Generator,
    n_boxes: int = 3,
    size_fraction: tuple[float, float] = (1 / 6, 1 / 3),
) -> Tensor:
    """Models Genesis in-painting: fill random boxes with uniform [0, 1) noise.

    ``n_boxes`` boxes, each axis ``size_fraction`` of the axis length (rounded, at least 1 voxel),
    are drawn with :func:`random_boxes`; then one uniform noise field of ``x``'s shape is drawn and
    copied into the boxes. Voxels outside the boxes are unchanged.
    """
    lo, hi = _fraction_sizes(x.shape[1:], size_fraction)
    boxes = random_boxes(x.shape[1:], generator, n_boxes, lo, hi)
    noise = _uniform_noise_like(x, generator)
    out = x.clone()
    for box in boxes:
        region = (slice(None), *box.slices)
        out[region] = noise[region]
    return out


def outpaint(
    x: Tensor,
    generator: torch.Generator,
    n_boxes: int = 3,
    size_fraction: tuple[float, float] = (3 / 7, 4 / 7),
) -> Tensor:
    """Models Genesis out-painting: keep random boxes and replace everything else by noise.

    ``n_boxes`` boxes (each axis ``size_fraction`` of its length) are drawn with
    :func:`random_boxes`, then a uniform [0, 1) noise field; the output is the noise outside the
    union of the boxes and ``x`` inside it.
    """
    lo, hi = _fraction_sizes(x.shape[1:], size_fraction)
    boxes = random_boxes(x.shape[1:], generator, n_boxes, lo, hi)
    out = _uniform_noise_like(x, generator)
    for box in boxes:
        region = (slice(None), *box.slices)
        out[region] = x[region]
    return out


def cutout(
    x: Tensor,
    generator: torch.Generator,
    n_boxes: int = 1,
    size_fraction: tuple[float, float] = (0.1, 0.3),
    fill: float = 0.0,
) -> Tensor:
    """Cutout (DeVries & Taylor, 2017; PCRLv2's 2D local augmentation): boxes set to ``fill``.

    Boxes as in :func:`inpaint`; voxels outside the boxes are unchanged.
    """
    lo, hi = _fraction_sizes(x.shape[1:], size_fraction)
    boxes = random_boxes(x.shape[1:], generator, n_boxes, lo, hi)
    out = x.clone()
    for box in boxes:
        out[(slice(None), *box.slices)] = fill
    return out


def swap(
    x: Tensor,
    generator: torch.Generator,
    n_swaps: int = 20,
    patch_size: int | Sequence[int] = 8,
) -> Tensor:
    """PCRLv2's 3D local augmentation (TorchIO ``RandomSwap``): swap pairs of random patches.

    For each of ``n_swaps`` iterations two patches of ``patch_size`` voxels (clamped to the image
    shape) are drawn with :func:`random_boxes` (``n=2``) and their contents exchanged. A pair
    that overlaps is skipped, so the result is always a permutation of the voxels of ``x``.
    Works in 2D as well.
    """
    shape = tuple(x.shape[1:])
    patches = _per_axis(patch_size, len(shape), "patch_size")
    size = tuple(min(p, n) for p, n in zip(patches, shape, strict=True))
    out = x.clone()
    for _ in range(n_swaps):
        first, second = random_boxes(shape, generator, 2, size, size)
        if first.intersection_volume(second) > 0:
            continue
        a, b = (slice(None), *first.slices), (slice(None), *second.slices)
        patch = out[a].clone()
        out[a] = out[b]
        out[b] = patch
    return out
