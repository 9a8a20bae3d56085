"""Two-view sampling with exact correspondence (DESIGN §2.5), multi-crop and sub-crop (§4.2).

The central device is a *coordinate image*: its channels are each voxel's own index position, so a
view of it shows, at every pixel, where that pixel came from. Bilinear interpolation of this linear
function is exact, which turns "the correspondence is right" into equalities up to float error.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from medssl_kit.data import augment
from medssl_kit.data.augment import Box
from medssl_kit.data.views import (
    PCRLV2_GLOBAL_SIZES,
    PCRLV2_LOCAL_SIZES,
    IntensityParams,
    ViewPair,
    ViewSpec,
    apply_intensity,
    apply_spatial,
    build_view_pair,
    correspondence,
    make_spatial_params,
    multi_crop,
    replay,
    sample_spatial,
    sample_view_pair,
    sub_crop,
)
from medssl_kit.errors import MedsslError

TOL = 1e-3
SEEDS = range(12)

# Image and (non-square, per-axis distinct) view sizes, so that axis-order mistakes show.
SHAPES = {2: ((60, 80), (24, 32)), 3: ((20, 30, 40), (8, 12, 16))}

NO_INTENSITY = dict(
    gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0, blur_prob=0.0, noise_prob=0.0
)
CONFIGS = {
    "crop": dict(flip_prob=0.0, rot90_prob=0.0, max_rotation_deg=0.0),
    "flip": dict(flip_prob=0.5, rot90_prob=0.0, max_rotation_deg=0.0),
    "rot90": dict(flip_prob=0.0, rot90_prob=1.0, max_rotation_deg=0.0),
    "rotation": dict(flip_prob=0.0, rot90_prob=0.0, max_rotation_deg=20.0),
    "zoom": dict(flip_prob=0.0, rot90_prob=0.0, max_rotation_deg=0.0, zoom=(0.8, 1.25)),
    "all": dict(flip_prob=0.5, rot90_prob=0.5, max_rotation_deg=15.0, zoom=(0.8, 1.25)),
}
# Configurations whose views stay inside the crop box, hence inside the image.
AXIS_ALIGNED = {"crop", "flip", "rot90"}


def coord_image(shape: tuple[int, ...]) -> torch.Tensor:
    """``Tensor[dims, *shape]`` (float64): every voxel holds its own (z, y, x) / (y, x) index."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def in_image(coords: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Pixels whose coordinates ``[dims, *V]`` lie in ``[0, n - 1]`` on every axis."""
    upper = torch.tensor(shape, dtype=coords.dtype).view(-1, *[1] * (coords.ndim - 1)) - 1
    return ((coords >= 0) & (coords <= upper)).all(0)


def make_spec(dims: int, config: str, **extra) -> ViewSpec:
    return ViewSpec(size=SHAPES[dims][1], **{**NO_INTENSITY, **CONFIGS[config], **extra})


def sample(dims: int, config: str, seed: int, **extra) -> ViewPair:
    image = coord_image(SHAPES[dims][0])
    return sample_view_pair(
        image, make_spec(dims, config, **extra), torch.Generator().manual_seed(seed)
    )


def clean_mask(pair: ViewPair, grid: torch.Tensor) -> torch.Tensor:
    """View-1 pixels whose view-2 interpolation neighbours are all inside the image.

    Where a neighbour is outside the image (rotated corners, zoom-out), view 2 holds zero padding
    there and no interpolation can be exact; everywhere else it must be.
    """
    mask2 = in_image(pair.coords2, pair.spatial2.image_shape).to(grid.dtype)
    sampled = F.grid_sample(mask2[None, None], grid[None], align_corners=True)[0, 0]
    return sampled > 1 - 1e-9


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_view_values_are_their_coordinates(dims: int, config: str) -> None:
    """(1) A view of the coordinate image equals its coords wherever the pixel is in the image."""
    shape = SHAPES[dims][0]
    drawn = []
    for seed in SEEDS:
        pair = sample(dims, config, seed)
        drawn += [pair.spatial1, pair.spatial2]
        for view, coords, params in (
            (pair.view1, pair.coords1, pair.spatial1),
            (pair.view2, pair.coords2, pair.spatial2),
        ):
            assert view.shape == (dims, *SHAPES[dims][1]) and coords.shape == view.shape
            torch.testing.assert_close(coords, params.coords_grid(), rtol=0, atol=1e-9)
            inside = in_image(coords, shape)
            assert (view - coords)[:, inside].abs().max() < TOL
            if config in AXIS_ALIGNED:
                # The view spans exactly its crop box, corner to corner.
                box = params.crop_box
                flat = coords.reshape(dims, -1)
                assert inside.all()
                assert flat.min(1).values.tolist() == pytest.approx(list(box.start))
                assert flat.max(1).values.tolist() == pytest.approx([b - 1 for b in box.stop])
    # The configuration's augmentations were actually drawn.
    flipped = [any(p.flips[i] for p in drawn) for i in range(dims)]
    assert all(flipped) if config in ("flip", "all") else not any(flipped)
    quarter_turns = {p.rot90_k for p in drawn}
    assert quarter_turns == (
        {1, 2, 3} if config == "rot90" else {0, 1, 2, 3} if config == "all" else {0}
    )
    assert any(p.angle_deg != 0 for p in drawn) == (config in ("rotation", "all"))


@pytest.mark.parametrize("dims", [2, 3])
def test_affine_is_a_rotated_resized_crop(dims: int) -> None:
    """No shear: view axes map to orthogonal image directions, scaled crop-to-view over zoom.

    View axis i spans crop axis i (the two in-plane axes swapped after an odd quarter turn), so
    column i of A has length (crop - 1) / (view - 1) / zoom along it.
    """
    zooms = set()
    for seed in SEEDS:
        params = sample(dims, "all", seed).spatial1
        a, _ = params.affine()
        crop = list(params.crop_size)
        if params.rot90_k % 2:
            crop[-2:] = crop[:-3:-1]
        lengths = [
            (e - 1) / (v - 1) / params.zoom for e, v in zip(crop, params.out_size, strict=True)
        ]
        expected = torch.diag(torch.tensor(lengths, dtype=torch.float64) ** 2)
        torch.testing.assert_close(a.T @ a, expected)
        assert 0.8 <= params.zoom <= 1.25
        zooms.add(params.zoom)
    assert len(zooms) > 1


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_grid_sample_of_view2_reproduces_view1(dims: int, config: str) -> None:
    """(2) Sampling view 2 at the grid gives view 1 wherever valid (and the rest is consistent)."""
    compared = 0
    for seed in SEEDS:
        pair = sample(dims, config, seed)
        grid, valid = correspondence(pair)
        assert grid.shape == (*SHAPES[dims][1], dims) and valid.shape == SHAPES[dims][1]
        assert grid.dtype == pair.view2.dtype and valid.dtype == torch.bool
        clean = clean_mask(pair, grid)
        if config in AXIS_ALIGNED:
            assert not (valid & ~clean).any()
        check = valid & clean
        warped = F.grid_sample(pair.view2[None], grid[None], align_corners=True)[0]
        if check.any():
            assert (warped - pair.view1)[:, check].abs().max() < TOL
        compared += int(check.sum())
        # Invalid in-image pixels map outside view 2; valid ones inside it.
        inside1 = in_image(pair.coords1, pair.spatial1.image_shape)
        outside2 = (grid.abs() > 1 + 1e-6).any(-1)
        assert torch.equal(valid, inside1 & ~outside2)
    assert compared > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_views_with_different_specs(dims: int) -> None:
    """Views of different sizes (one spec per view) still correspond exactly."""
    shape, size = SHAPES[dims]
    spec1 = make_spec(dims, "all")
    spec2 = dataclasses.replace(spec1, size=tuple(s + 4 for s in size))
    for seed in SEEDS:
        pair = sample_view_pair(
            coord_image(shape), (spec1, spec2), torch.Generator().manual_seed(seed)
        )
        assert pair.view2.shape[1:] == spec2.size
        grid, valid = correspondence(pair)
        check = valid & clean_mask(pair, grid)
        warped = F.grid_sample(pair.view2[None], grid[None], align_corners=True)[0]
        if check.any():
            assert (warped - pair.view1)[:, check].abs().max() < TOL


def test_valid_is_exact_for_known_overlaps() -> None:
    """(3) Partial overlap gives exactly the overlap; disjoint crops give no valid pixel."""
    shape = (64, 64)
    image = coord_image(shape)
    first = make_spatial_params(shape, (32, 32), (0, 0), (32, 32))
    overlapping = make_spatial_params(shape, (32, 32), (16, 16), (32, 32))
    disjoint = make_spatial_params(shape, (32, 32), (0, 32), (32, 32))
    _, valid = correspondence(build_view_pair(image, first, overlapping))
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[16:, 16:] = True
    assert torch.equal(valid, expected)
    _, valid = correspondence(build_view_pair(image, first, disjoint))
    assert not valid.any()


def test_valid_excludes_points_outside_the_image() -> None:
    """A view-1 pixel outside the image (zoomed out) is invalid even where it is inside view 2."""
    shape = (40, 40)
    image = coord_image(shape)
    zoomed_out = make_spatial_params(shape, (20, 20), (0, 0), (40, 40), zoom=0.5)
    whole = make_spatial_params(shape, (40, 40), (0, 0), (40, 40))
    pair = build_view_pair(image, zoomed_out, zoomed_out)
    _, valid = correspondence(pair)
    assert torch.equal(valid, in_image(pair.coords1, shape))
    assert 0 < valid.sum() < valid.numel()
    _, valid = correspondence(build_view_pair(image, zoomed_out, whole))
    assert torch.equal(valid, in_image(pair.coords1, shape))


def test_flips_and_quarter_turns_match_torch() -> None:
    """Crops resized 1:1 reproduce slicing, torch.flip and torch.rot90(crop, -k) exactly."""
    image = torch.randn(2, 30, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    crop = image[:, 5:21, 7:31]  # 16 x 24
    view, _ = apply_spatial(image, make_spatial_params((30, 40), (16, 24), (5, 7), (16, 24)))
    torch.testing.assert_close(view, crop)
    flipped = make_spatial_params((30, 40), (16, 24), (5, 7), (16, 24), flips=(True, False))
    torch.testing.assert_close(apply_spatial(image, flipped)[0], crop.flip(1))
    for k in (1, 2, 3):
        out = (24, 16) if k % 2 else (16, 24)
        params = make_spatial_params((30, 40), out, (5, 7), (16, 24), rot90_k=k)
        torch.testing.assert_close(apply_spatial(image, params)[0], torch.rot90(crop, -k, (1, 2)))


def test_labels_use_nearest_and_keep_dtype() -> None:
    """Label maps resample with mode='nearest', keep their integer dtype and follow the coords."""
    shape = (60, 80)
    labels = (coord_image(shape)[0] > 30).to(torch.int64)[None]
    spec = make_spec(2, "all")
    for seed in SEEDS:
        params = sample_spatial(shape, spec, torch.Generator().manual_seed(seed))
        view, coords = apply_spatial(labels, params, mode="nearest")
        assert view.dtype == torch.int64
        inside = in_image(coords, shape) & ((coords[0] - 30.5).abs() > 1e-3)
        assert torch.equal(view[0][inside], (coords[0][inside] > 30.5).to(torch.int64))
    with pytest.raises(ValueError, match="nearest"):
        apply_spatial(labels, params)


def _intensity_spec(dims: int, **extra) -> ViewSpec:
    """Every intensity augmentation on (unless overridden), on the "all" spatial config."""
    probs = dict(
        gamma_prob=1.0, contrast_prob=1.0, brightness_prob=1.0, blur_prob=1.0, noise_prob=1.0
    )
    return make_spec(dims, "all", **{**probs, **extra})


@pytest.mark.parametrize("dims", [2, 3])
def test_intensity_never_moves_pixels(dims: int) -> None:
    """(4) Intensity augmentation leaves the geometry alone and is pointwise (blur symmetric)."""
    image = coord_image(SHAPES[dims][0])
    for seed in SEEDS:
        plain = sample_view_pair(image, make_spec(dims, "all"), torch.Generator().manual_seed(seed))
        aug = sample_view_pair(image, _intensity_spec(dims), torch.Generator().manual_seed(seed))
        assert aug.spatial1 == plain.spatial1 and aug.spatial2 == plain.spatial2
        assert torch.equal(aug.coords1, plain.coords1) and torch.equal(aug.coords2, plain.coords2)
        assert aug.intensity1 != IntensityParams() and aug.intensity1.noise_std > 0
        assert aug.intensity1.noise_seed != aug.intensity2.noise_seed  # independent noise

    # Without blur and noise the map is pointwise: it commutes with any permutation of pixels.
    generator = torch.Generator().manual_seed(1)
    view = torch.rand(1, 24, 32, generator=generator, dtype=torch.float64)
    params = IntensityParams(gamma=0.8, contrast=1.2, brightness=0.05)
    perm = torch.randperm(view.numel(), generator=generator)
    permuted = view.reshape(-1)[perm].reshape(view.shape)
    torch.testing.assert_close(
        apply_intensity(permuted, params),
        apply_intensity(view, params).reshape(-1)[perm].reshape(view.shape),
    )
    # Noise is additive and independent of the content.
    noisy = IntensityParams(noise_std=0.1, noise_seed=7)
    torch.testing.assert_close(
        apply_intensity(view, noisy) - apply_intensity(permuted, noisy), view - permuted
    )
    # Blur keeps a bright spot where it was (centroid unchanged).
    spot = torch.zeros(1, 21, 21, dtype=torch.float64)
    spot[0, 8, 12] = 1.0
    blurred = apply_intensity(spot, IntensityParams(blur_sigma=1.5))[0]
    grid = coord_image((21, 21))
    centroid = (grid * blurred).sum((1, 2)) / blurred.sum()
    torch.testing.assert_close(centroid, torch.tensor([8.0, 12.0], dtype=torch.float64))


@pytest.mark.parametrize("dims", [2, 3])
def test_intensity_remap(dims: int) -> None:
    """The random lookup table is drawn after the other intensity values, applied first, pointwise
    and replayed; a view of an intensity ramp shows the table's knot values."""
    image = coord_image(SHAPES[dims][0])[-1:] / (SHAPES[dims][0][-1] - 1)  # 0 .. 1 along x
    base = _intensity_spec(dims, blur_prob=0.0, noise_prob=0.0)
    remapped = dataclasses.replace(base, remap_prob=1.0, remap_knots=5)
    tables = set()
    for seed in SEEDS:
        plain = sample_view_pair(image, base, torch.Generator().manual_seed(seed))
        pair = sample_view_pair(image, remapped, torch.Generator().manual_seed(seed))
        assert pair.spatial1 == plain.spatial1 and pair.spatial2 == plain.spatial2
        without = dataclasses.replace(pair.intensity1, remap=())
        assert without == plain.intensity1 and len(pair.intensity1.remap) == 5
        assert pair.intensity1.remap != pair.intensity2.remap
        tables.add(pair.intensity1.remap)
        looked_up = augment.intensity_lookup(
            apply_spatial(image, pair.spatial1)[0], pair.intensity1.remap
        )
        expected = apply_intensity(looked_up, without)
        torch.testing.assert_close(pair.view1, expected)
        torch.testing.assert_close(replay(pair, image).view1, pair.view1, rtol=0, atol=0)
    assert len(tables) == len(SEEDS)
    ramp = torch.linspace(0, 1, 9, dtype=torch.float64)[None]
    table = (0.2, 0.9, 0.0, 0.5, 0.7)
    out = apply_intensity(ramp, IntensityParams(remap=table))
    torch.testing.assert_close(out[0, ::2], torch.tensor(table, dtype=torch.float64))
    assert not (out.diff() >= 0).all()  # not monotone
    off = dataclasses.replace(base, remap_prob=0.0, remap_knots=3)
    pair = sample_view_pair(image, off, torch.Generator().manual_seed(0))
    assert pair.intensity1.remap == () and pair.intensity2.remap == ()


@pytest.mark.parametrize("dims", [2, 3])
def test_replay(dims: int) -> None:
    """(5) Replay reuses every parameter, noise included, on another image of the same shape."""
    shape = SHAPES[dims][0]
    image = coord_image(shape) / max(shape)
    other = torch.rand(image.shape, generator=torch.Generator().manual_seed(99), dtype=image.dtype)
    spec = _intensity_spec(dims, gamma_prob=0.0, contrast_prob=0.0, blur_prob=0.0)
    for seed in SEEDS:
        pair = sample_view_pair(image, spec, torch.Generator().manual_seed(seed))
        same = replay(pair, image)
        torch.testing.assert_close(same.view1, pair.view1, rtol=0, atol=0)
        torch.testing.assert_close(same.view2, pair.view2, rtol=0, atol=0)
        again = replay(pair, other)
        assert (again.spatial1, again.spatial2) == (pair.spatial1, pair.spatial2)
        assert (again.intensity1, again.intensity2) == (pair.intensity1, pair.intensity2)
        assert torch.equal(again.coords1, pair.coords1) and torch.equal(again.coords2, pair.coords2)
        # Brightness and noise are additive, so the difference is the resampled image difference.
        difference = apply_spatial(other - image, pair.spatial1)[0]
        torch.testing.assert_close(again.view1 - pair.view1, difference)
    with pytest.raises(ValueError, match="spatial shape"):
        replay(pair, image[(slice(None),) * dims + (slice(1, None),)])


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_views(dims: int) -> None:
    """(6) The generator is the only source of randomness."""
    image = coord_image(SHAPES[dims][0]) / 100
    spec = _intensity_spec(dims)
    torch.manual_seed(0)
    a = sample_view_pair(image, spec, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    b = sample_view_pair(image, spec, torch.Generator().manual_seed(5))
    c = sample_view_pair(image, spec, torch.Generator().manual_seed(6))
    assert (a.spatial1, a.spatial2, a.intensity1, a.intensity2) == (
        b.spatial1,
        b.spatial2,
        b.intensity1,
        b.intensity2,
    )
    assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)
    assert a.spatial1 != c.spatial1 and not torch.equal(a.view1, c.view1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("align_corners", [True, False])
def test_lower_resolution_features(dims: int, align_corners: bool) -> None:
    """(9) Grids for feature maps at half resolution, under both pixel-alignment conventions.

    align_corners=True: features made by F.interpolate(align_corners=True); False: features made
    by 2x average pooling (the geometry of strided encoders). Both are exact for a linear image.
    """
    mode = "bilinear" if dims == 2 else "trilinear"
    size = tuple(s // 2 for s in SHAPES[dims][1])
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d

    def features(x: torch.Tensor) -> torch.Tensor:
        if align_corners:
            return F.interpolate(x[None], size=size, mode=mode, align_corners=True)[0]
        return pool(x[None], 2)[0]

    compared = 0
    for seed in SEEDS:
        pair = sample(dims, "all", seed)
        grid, valid = correspondence(pair, feature_size=size, align_corners=align_corners)
        assert grid.shape == (*size, dims) and valid.shape == size
        feat1, feat2 = features(pair.view1), features(pair.view2)
        clean1 = features(in_image(pair.coords1, pair.spatial1.image_shape)[None].double())[0]
        clean2 = features(in_image(pair.coords2, pair.spatial2.image_shape)[None].double())
        clean2 = F.grid_sample(clean2[None], grid[None], align_corners=align_corners)[0, 0]
        check = valid & (clean1 > 1 - 1e-9) & (clean2 > 1 - 1e-9)
        warped = F.grid_sample(feat2[None], grid[None], align_corners=align_corners)[0]
        if check.any():
            assert (warped - feat1)[:, check].abs().max() < TOL
        compared += int(check.sum())
    assert compared > 0
    full, _ = correspondence(pair, feature_size=pair.spatial1.out_size)
    torch.testing.assert_close(full, correspondence(pair)[0])


def test_multi_crop_scales() -> None:
    """(7) PCRLv2 multi-crop: 2 global views covering 30-100 %, locals 5-30 % of the area."""
    shape = (96, 128)
    image = coord_image(shape)
    global_spec = ViewSpec(size=(64, 64), scale=(0.3, 1.0), **NO_INTENSITY)
    local_spec = ViewSpec(size=(24, 24), scale=(0.05, 0.3), **NO_INTENSITY)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        views = multi_crop(image, global_spec, local_spec, 6, generator)
        assert len(views) == 8
        for i, (view, coords, params) in enumerate(views):
            low, high = (0.3, 1.0) if i < 2 else (0.05, 0.3)
            assert view.shape[1:] == ((64, 64) if i < 2 else (24, 24))
            assert low <= params.crop_box.volume / (96 * 128) <= high
            inside = in_image(coords, shape)
            assert (view - coords)[:, inside].abs().max() < TOL
    with pytest.raises(ValueError, match="2D image"):
        multi_crop(coord_image((8, 8, 8)), global_spec, local_spec, 2, generator)


def _clamped(sizes, bound) -> set[tuple[int, ...]]:
    return {tuple(min(s, b) for s, b in zip(size, bound, strict=True)) for size in sizes}


@pytest.mark.parametrize("shape", [(16, 64, 64), (48, 128, 128), (80, 144, 144)])
def test_sub_crop(shape: tuple[int, int, int]) -> None:
    """(8) PCRLv2 sub-crop: IoU >= 0.3, locals inside the minimum bounding box, paper sizes."""
    volume = coord_image(shape).float()
    whole = Box((0, 0, 0), shape)
    generator = torch.Generator().manual_seed(0)
    sizes: set[tuple[int, ...]] = set()
    for _ in range(4):
        result = sub_crop(volume, generator)
        box1, box2 = result.global_boxes
        assert result.iou == pytest.approx(box1.iou(box2)) and result.iou >= 0.3
        assert result.bounding_box == box1.bounding_box(box2)
        assert whole.contains(result.bounding_box)
        assert {box1.size, box2.size} <= _clamped(PCRLV2_GLOBAL_SIZES, shape)
        sizes |= {box1.size, box2.size}
        if shape == (16, 64, 64):
            assert box1 == box2 == whole
        assert len(result.global_views) == 2 and len(result.local_views) == 6
        for view, coords in zip(result.global_views, result.global_coords, strict=True):
            assert view.shape == (3, 32, 64, 64)
            inside = in_image(coords, shape)
            assert (view - coords)[:, inside].abs().max() < TOL
        for box, view, coords in zip(
            result.local_boxes, result.local_views, result.local_coords, strict=True
        ):
            assert view.shape == (3, 16, 16, 16)
            assert result.bounding_box.contains(box)
            assert box.size in _clamped(PCRLV2_LOCAL_SIZES, result.bounding_box.size)
            assert (view - coords).abs().max() < TOL
    if shape == (80, 144, 144):
        assert len(sizes) > 1  # sizes are drawn from the set, not fixed


def test_sub_crop_unreachable_iou_raises() -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(MedsslError, match="IoU >= 0.99"):
        sub_crop(torch.zeros(1, 64, 64, 64), generator, global_sizes=[(8, 8, 8)], iou_min=0.99)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="size"):
        ViewSpec(size=(1, 32))
    with pytest.raises(ValueError, match="scale"):
        ViewSpec(size=(32, 32), scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="flip_prob"):
        ViewSpec(size=(32, 32), flip_prob=1.5)
    with pytest.raises(ValueError, match="remap_prob"):
        ViewSpec(size=(32, 32), remap_prob=-0.1)
    with pytest.raises(ValueError, match="remap_knots"):
        ViewSpec(size=(32, 32), remap_knots=1)
    with pytest.raises(ValueError, match="spatial shape"):
        sample_spatial((32, 32, 32), ViewSpec(size=(16, 16)), torch.Generator())
