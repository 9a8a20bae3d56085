"""Intensity and local corruption transforms: each does what its docstring says."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from medssl_kit.data import augment
from medssl_kit.data.augment import Box, random_boxes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unique_image(shape: tuple[int, ...]) -> torch.Tensor:
    """Two channels: distinct values in [0, 1) and their double, to track voxels moving."""
    values = torch.randperm(int(torch.tensor(shape).prod()), generator=gen(0)).double()
    first = (values / values.numel()).reshape(shape)
    return torch.stack([first, 2 * first])


def union_mask(shape: tuple[int, ...], boxes: list[Box]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for box in boxes:
        mask[box.slices] = True
    return mask


SHAPES = [(24, 32), (10, 16, 20)]

CORRUPTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": lambda x, g: augment.gaussian_noise(x, g, 0.1),
    "nonlinear_intensity": augment.nonlinear_intensity,
    "local_pixel_shuffle": lambda x, g: augment.local_pixel_shuffle(x, g, n_blocks=50),
    "inpaint": augment.inpaint,
    "outpaint": augment.outpaint,
    "cutout": augment.cutout,
    "swap": lambda x, g: augment.swap(x, g, n_swaps=5, patch_size=4),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_seeded_and_pure(name: str, shape: tuple[int, ...]) -> None:
    x = unique_image(shape)
    before = x.clone()
    fn = CORRUPTIONS[name]
    a, b, c = fn(x, gen(1)), fn(x, gen(1)), fn(x, gen(2))
    assert torch.equal(x, before)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)


def test_random_boxes_inside_and_sized() -> None:
    shape = (10, 16, 20)
    boxes = random_boxes(shape, gen(0), 200, (1, 2, 3), (4, 40, 6))
    whole = Box((0, 0, 0), shape)
    assert all(whole.contains(b) for b in boxes)
    assert all(1 <= b.size[0] <= 4 and 2 <= b.size[1] <= 16 and 3 <= b.size[2] <= 6 for b in boxes)
    assert random_boxes(shape, gen(3), 5, 2, 5) == random_boxes(shape, gen(3), 5, 2, 5)


def test_box_geometry() -> None:
    a, b = Box((0, 0), (4, 4)), Box((2, 2), (4, 4))
    assert a.intersection_volume(b) == 4 and a.iou(b) == pytest.approx(4 / 28)
    assert a.bounding_box(b) == Box((0, 0), (6, 6))
    assert a.bounding_box(b).contains(a) and not a.contains(b)
    assert a.iou(Box((4, 4), (2, 2))) == 0.0
    with pytest.raises(ValueError):
        Box((0, 0), (0, 3))


def test_gaussian_noise_statistics() -> None:
    x = torch.zeros(1, 200, 200, dtype=torch.float64)
    noisy = augment.gaussian_noise(x, gen(0), 0.2)
    assert noisy.mean().abs() < 0.01 and noisy.std().item() == pytest.approx(0.2, rel=0.03)


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_blur_keeps_mass_and_position(shape: tuple[int, ...]) -> None:
    constant = torch.full((2, *shape), 0.7, dtype=torch.float64)
    torch.testing.assert_close(augment.gaussian_blur(constant, 1.2), constant)
    x = unique_image(shape)
    torch.testing.assert_close(augment.gaussian_blur(x, 0.0), x)
    spot = torch.zeros(1, *shape, dtype=torch.float64)
    centre = tuple(n // 2 for n in shape)
    spot[(0, *centre)] = 1.0
    blurred = augment.gaussian_blur(spot, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0)
    assert blurred[(0, *centre)] < 1.0 and blurred.argmax() == spot.argmax()
    anisotropic = augment.gaussian_blur(spot, (0.0,) * (len(shape) - 1) + (1.0,))
    # Only the last axis is smoothed.
    assert torch.count_nonzero(anisotropic.sum(-1)) == 1


def test_gamma_stays_in_unit_range_and_is_monotone() -> None:
    x = torch.linspace(-0.5, 1.5, 101, dtype=torch.float64)[None]
    for value in (0.5, 1.0, 2.0):
        out = augment.gamma(x, value)
        assert out.min() >= 0 and out.max() <= 1
        assert (out.diff() >= 0).all()
    inside = torch.linspace(0, 1, 11, dtype=torch.float64)[None]
    torch.testing.assert_close(augment.gamma(inside, 1.0), inside)
    assert (augment.gamma(inside, 0.5) >= inside).all()
    with pytest.raises(ValueError):
        augment.gamma(inside, 0.0)


def test_contrast_and_brightness() -> None:
    x = unique_image((24, 32))
    out = augment.contrast(x, 1.5)
    torch.testing.assert_close(out.mean((1, 2)), x.mean((1, 2)))
    torch.testing.assert_close(out.std((1, 2)), 1.5 * x.std((1, 2)))
    torch.testing.assert_close(augment.brightness(x, 0.1), x + 0.1)


def test_nonlinear_intensity_is_a_monotone_map_of_unit_range() -> None:
    x = torch.linspace(0, 1, 501, dtype=torch.float64)[None]
    directions = set()
    for seed in range(20):
        out = augment.nonlinear_intensity(x, gen(seed))
        assert out.min() >= 0 and out.max() <= 1
        steps = out.diff()
        assert (steps >= -1e-12).all() or (steps <= 1e-12).all()
        increasing = bool((steps >= -1e-12).all())
        directions.add(increasing)
        ends = (0.0, 1.0) if increasing else (1.0, 0.0)
        assert out[0, [0, -1]].tolist() == pytest.approx(ends, abs=1e-6)
    assert directions == {True, False}
    never = augment.nonlinear_intensity(x, gen(0), invert_prob=0.0)
    assert (never.diff() >= -1e-12).all()


def test_intensity_lookup_passes_through_its_knots_and_may_invert_order() -> None:
    table = (0.9, 0.1, 0.6)  # knots at 0, 0.5, 1
    x = torch.tensor([[-0.2, 0.0, 0.25, 0.5, 0.75, 1.0, 1.3]], dtype=torch.float64)
    expected = torch.tensor([[0.9, 0.9, 0.5, 0.1, 0.35, 0.6, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(augment.intensity_lookup(x, table), expected)
    # Brighter in, darker out: 0.25 < 0.5 but maps above it.
    out = augment.intensity_lookup(x, table)
    assert out[0, 2] > out[0, 3]
    image = unique_image((24, 32)).float()
    assert augment.intensity_lookup(image, table).dtype == torch.float32
    with pytest.raises(ValueError, match="2 knots"):
        augment.intensity_lookup(x, (0.5,))


def test_random_lookup_table_draws_one_uniform_per_knot() -> None:
    table = augment.random_lookup_table(gen(3), 8)
    reference = gen(3)
    assert table == tuple(augment.uniform(reference, 0.0, 1.0) for _ in range(8))
    assert len(set(table)) == 8 and all(0.0 <= v < 1.0 for v in table)
    assert augment.random_lookup_table(gen(4), 8) != table


@pytest.mark.parametrize("shape", SHAPES)
def test_local_pixel_shuffle_permutes_within_blocks(shape: tuple[int, ...]) -> None:
    x = unique_image(shape)
    out = augment.local_pixel_shuffle(x, gen(4), n_blocks=30, max_fraction=0.3)
    boxes = random_boxes(shape, gen(4), 30, 1, tuple(max(1, int(n * 0.3)) for n in shape))
    touched = union_mask(shape, boxes)
    assert torch.equal(out[:, ~touched], x[:, ~touched])
    assert not torch.equal(out[:, touched], x[:, touched])
    # A permutation of whole voxels: values preserved, channels moved together.
    torch.testing.assert_close(out[1], 2 * out[0])
    assert torch.equal(out[0].flatten().sort().values, x[0].flatten().sort().values)
    # A single block keeps the multiset of its own values.
    single = augment.local_pixel_shuffle(x, gen(5), n_blocks=1, max_fraction=0.5)
    (box,) = random_boxes(shape, gen(5), 1, 1, tuple(max(1, int(n * 0.5)) for n in shape))
    inside = (slice(None), *box.slices)
    assert torch.equal(single[inside].flatten().sort().values, x[inside].flatten().sort().values)
    assert torch.equal(single[:, ~union_mask(shape, [box])], x[:, ~union_mask(shape, [box])])


@pytest.mark.parametrize("shape", SHAPES)
def test_block_pixel_shuffle_moves_voxels_only_within_fixed_size_blocks(shape) -> None:
    x = unique_image(shape)
    size = [max(1, int(n * 0.2)) for n in shape]
    out = augment.block_pixel_shuffle(x, gen(4), n_blocks=40, fraction=0.2)
    torch.testing.assert_close(out[1], 2 * out[0])  # channels move together
    # where each voxel's value came from, by the unique values of x
    where = {float(v): i for i, v in enumerate(x[0].flatten())}
    source = torch.tensor([where[float(v)] for v in out[0].flatten()])
    coords = torch.stack(torch.unravel_index(torch.arange(source.numel()), shape), -1)
    moved = torch.stack(torch.unravel_index(source, shape), -1)
    assert ((coords - moved).abs() < torch.tensor(size)).all()  # never further than a block
    assert 0 < (source != torch.arange(source.numel())).sum() < source.numel()
    # one block: a permutation of exactly one box of the fixed size, nothing else touched
    single = augment.block_pixel_shuffle(x, gen(5), n_blocks=1, fraction=0.2)
    changed = (single[0] != x[0]).nonzero()
    span = changed.max(0).values - changed.min(0).values + 1
    assert (span <= torch.tensor(size)).all() and len(changed) > 0.5 * math.prod(size)
    lo, hi = changed.min(0).values, changed.max(0).values + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    assert torch.equal(single[0][box].flatten().sort().values, x[0][box].flatten().sort().values)
    # blocks of one voxel change nothing
    assert torch.equal(augment.block_pixel_shuffle(x, gen(6), fraction=0.01), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_inpaint_outpaint_cutout_respect_their_boxes(shape: tuple[int, ...]) -> None:
    x = torch.full((2, *shape), 5.0, dtype=torch.float64)

    def boxes_of(seed: int, fraction: tuple[float, float], n: int) -> torch.Tensor:
        lo = tuple(max(1, round(s * fraction[0])) for s in shape)
        hi = tuple(max(1, round(s * fraction[1])) for s in shape)
        return union_mask(shape, random_boxes(shape, gen(seed), n, lo, hi))

    out = augment.inpaint(x, gen(1))
    mask = boxes_of(1, (1 / 6, 1 / 3), 3)
    assert torch.equal(out[:, ~mask], x[:, ~mask])
    assert (out[:, mask] >= 0).all() and (out[:, mask] < 1).all()

    out = augment.outpaint(x, gen(2))
    mask = boxes_of(2, (3 / 7, 4 / 7), 3)
    assert torch.equal(out[:, mask], x[:, mask])
    assert (out[:, ~mask] >= 0).all() and (out[:, ~mask] < 1).all()

    out = augment.cutout(x, gen(3), n_boxes=2, fill=-1.0)
    mask = boxes_of(3, (0.1, 0.3), 2)
    assert (out[:, mask] == -1).all() and torch.equal(out[:, ~mask], x[:, ~mask])


@pytest.mark.parametrize("shape", SHAPES)
def test_swap_exchanges_patches(shape: tuple[int, ...]) -> None:
    x = unique_image(shape)
    out = augment.swap(x, gen(0), n_swaps=30, patch_size=3)
    assert torch.equal(out[0].flatten().sort().values, x[0].flatten().sort().values)
    torch.testing.assert_close(out[1], 2 * out[0])
    # One swap: the two patches trade places and nothing else changes. (swap draws its pair
    # with random_boxes, so the same seed reproduces it; pick a seed whose pair is disjoint.)
    pairs = {seed: random_boxes(shape, gen(seed), 2, 4, 4) for seed in range(200)}
    seed = next(s for s, (p, q) in pairs.items() if p.intersection_volume(q) == 0)
    first, second = pairs[seed]
    out = augment.swap(x, gen(seed), n_swaps=1, patch_size=4)
    a, b = (slice(None), *first.slices), (slice(None), *second.slices)
    assert torch.equal(out[a], x[b]) and torch.equal(out[b], x[a])
    rest = ~union_mask(shape, [first, second])
    assert torch.equal(out[:, rest], x[:, rest])
    # An overlapping pair is skipped (swapping it would not be a permutation).
    seed = next(s for s, (p, q) in pairs.items() if p.intersection_volume(q) > 0)
    assert torch.equal(augment.swap(x, gen(seed), n_swaps=1, patch_size=4), x)
