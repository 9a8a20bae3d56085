"""Two-view sampling with exact pixel correspondence, multi-crop, sub-crop and overlapping crops
(DESIGN §2.5, §4.5).

Conventions
-----------
- Images are ``Tensor[C, *S]`` with ``S = (H, W)`` in 2D or ``(D, H, W)`` in 3D (axial slices
  first). Views are ``Tensor[C, *V]``.
- Coordinates are in voxel index units of the ORIGINAL image, ordered like ``S``: ``(y, x)`` in
  2D, ``(z, y, x)`` in 3D. Voxel ``i`` has its centre at coordinate ``i``; the image spans
  ``[0, n - 1]`` on an axis of ``n`` voxels (the "align_corners=True" convention).
- Every spatial augmentation (random resized crop, flips, in-plane 90° rotations, small free
  in-plane rotation, optional zoom) is one affine map from view pixel index ``j`` (ordered like
  ``V``) to original coordinate: ``coords = A @ j + b``, stored in :class:`SpatialParams`. The view
  is the original resampled at those coordinates with ``F.grid_sample(..., align_corners=True)``,
  zeros outside the image.
- Crops use corner alignment too: a crop of ``e`` voxels starting at voxel ``a`` resized to ``V``
  pixels maps view pixel ``0`` to voxel ``a`` and pixel ``V - 1`` to voxel ``a + e - 1``, so an
  axis-aligned crop never samples outside the image. Views and crops need >= 2 pixels per axis.
- All randomness comes from the ``torch.Generator`` passed in, so results are reproducible; the
  sampled parameters are recorded so that they can be replayed on another image (:func:`replay`).

Correspondence and feature maps
-------------------------------
:func:`correspondence` gives, for every view-1 location, where the same anatomical point lies in
view 2, as a grid for ``F.grid_sample`` (last axis ordered ``(x, y[, z])``, normalised to
[-1, 1]), plus a ``valid`` mask. Grids are normalised, hence independent of the *size* of the
view-2 feature map, but they depend on how feature pixels sit on view pixels, which is what the
``align_corners`` argument states (use the same value in ``grid_sample``):

- ``align_corners=True`` (default): feature pixel ``0`` sits on view pixel ``0`` and feature pixel
  ``F - 1`` on view pixel ``V - 1`` (``q = p (F - 1) / (V - 1)``). Exact for full-resolution
  features (``F == V``, e.g. a UNet decoder output) and for features resized with
  ``F.interpolate(..., align_corners=True)``.
- ``align_corners=False``: feature pixel ``q`` covers view pixels ``[q V/F, (q + 1) V/F)``,
  centre ``(q + 0.5) V / F - 0.5`` -- the geometry of stride-``V/F`` pooling or strided convs
  with "same" padding. The grid is then normalised with ``g = (2 p + 1) / V - 1``.

``feature_size`` sets the size of the view-1 feature map: the grid has one entry per view-1
feature pixel (at that pixel's centre under the chosen convention), so ``grid_sample`` of view-2
features at any resolution returns a map aligned with the view-1 features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from medssl_kit.data import augment
from medssl_kit.data.augment import Box, randint, uniform
from medssl_kit.errors import MedsslError

__all__ = [
    "PCRLV2_GLOBAL_OUT",
    "PCRLV2_GLOBAL_SIZES",
    "PCRLV2_LOCAL_OUT",
    "PCRLV2_LOCAL_SIZES",
    "IntensityParams",
    "SpatialParams",
    "SubCrop",
    "ViewPair",
    "ViewSpec",
    "apply_intensity",
    "apply_spatial",
    "build_view_pair",
    "correspondence",
    "make_spatial_params",
    "multi_crop",
    "overlapping_crops",
    "replay",
    "sample_intensity",
    "sample_spatial",
    "sample_view_pair",
    "shared_voxels",
    "sub_crop",
]

# Tolerance (voxels / view pixels) of the inside-tests in `correspondence`, computed in float64.
_EPS = 1e-6
# Random-resized-crop attempts before the deterministic fallback (torchvision uses 10).
_CROP_ATTEMPTS = 20


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}: {value}")


@dataclass(frozen=True)
class ViewSpec:
    """Spatial and intensity augmentation settings of one view.

    Spatial (every one an affine map, see the module docstring):
        size: output view size per spatial axis (pixels), like ``S``; at least 2 per axis.
        scale: range of the fraction of the image area (2D) / volume (3D) the crop covers.
        ratio: range of the in-plane aspect ratio ``width / height`` of the crop (voxels), drawn
            log-uniformly. In 3D each leading (depth) axis covers ``scale ** (1 / dims)`` of its
            length and the in-plane extents share the rest.
        flip_prob: probability of a flip, independently per axis (all axes, depth included).
        rot90_prob: probability of an in-plane (H, W) rotation by ``k * 90°``, ``k`` uniform in
            {1, 2, 3}; ``k`` quarter turns equal ``torch.rot90(crop, -k, dims=(-2, -1))``
            (clockwise as displayed with row 0 on top). For non-square views the crop is taken
            with swapped in-plane extents, so the output size stays ``size``.
        max_rotation_deg: small free in-plane rotation, uniform in ``[-max, max]`` degrees, about
            the crop centre (corners may leave the image: those pixels are zero).
        zoom: extra isotropic scaling, uniform in the range; ``> 1`` zooms in (the view covers
            ``zoom ** -dims`` of the crop), ``< 1`` zooms out (the view extends beyond the crop).
    Intensity (never moves a pixel; data assumed in [0, 1], see :mod:`medssl_kit.data.augment`),
    each applied with its probability, in this order:
        remap_prob, remap_knots: a random lookup table
            (:func:`~medssl_kit.data.augment.intensity_lookup`), ``remap_knots`` evenly spaced
            knots of [0, 1] with values uniform in [0, 1]: a non-monotone remapping that changes
            which tissue is brighter than which, so that two views can only be matched by
            structure, not brightness. Off by default (no method's paper uses it).
        gamma, gamma_prob: gamma exponent range.
        contrast, contrast_prob: contrast factor range (about the view's channel mean).
        brightness, brightness_prob: additive shift, uniform in ``[-brightness, brightness]``.
        blur_sigma, blur_prob: Gaussian blur sigma range in pixels of the view.
        noise_std, noise_prob: standard deviation of additive Gaussian noise.
    """

    size: tuple[int, ...]
    scale: tuple[float, float] = (0.3, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    rot90_prob: float = 0.5
    max_rotation_deg: float = 10.0
    zoom: tuple[float, float] = (1.0, 1.0)
    remap_prob: float = 0.0
    remap_knots: int = 8
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    contrast_prob: float = 0.5
    brightness: float = 0.1
    brightness_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    blur_prob: float = 0.2
    noise_std: float = 0.02
    noise_prob: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(self.size))
        if len(self.size) not in (2, 3) or any(int(s) != s or s < 2 for s in self.size):
            raise ValueError(f"size must be 2 or 3 integers >= 2 (pixels), got {self.size}")
        _check_range("scale", self.scale, 1e-9, 1.0)
        _check_range("ratio", self.ratio, 1e-9, math.inf)
        _check_range("zoom", self.zoom, 1e-9, math.inf)
        _check_range("gamma", self.gamma, 1e-9, math.inf)
        _check_range("contrast", self.contrast, 0.0, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
        if int(self.remap_knots) != self.remap_knots or self.remap_knots < 2:
            raise ValueError(f"remap_knots must be an integer >= 2, got {self.remap_knots}")
        for name in ("flip", "rot90", "remap", "gamma", "contrast", "brightness", "blur", "noise"):
            p = getattr(self, f"{name}_prob")
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}_prob must be in [0, 1], got {p}")
        if self.max_rotation_deg < 0 or self.brightness < 0 or self.noise_std < 0:
            raise ValueError("max_rotation_deg, brightness and noise_std must be >= 0")


@dataclass(frozen=True)
class SpatialParams:
    """Everything needed to replay one view's spatial augmentation.

    ``coords = matrix @ j + offset`` maps a view pixel index ``j`` (ordered like ``out_size``) to
    original voxel coordinates (ordered like ``image_shape``); float64 values. The drawn values
    are kept for inspection: the crop box (``crop_start``/``crop_size`` in voxels of the original,
    before rotation and zoom), per-axis ``flips`` (in the view frame), in-plane ``rot90_k``
    (quarter turns), ``angle_deg`` and ``zoom``. Build one with :func:`make_spatial_params`.
    """

    image_shape: tuple[int, ...]
    out_size: tuple[int, ...]
    matrix: tuple[tuple[float, ...], ...]
    offset: tuple[float, ...]
    crop_start: tuple[int, ...]
    crop_size: tuple[int, ...]
    flips: tuple[bool, ...]
    rot90_k: int
    angle_deg: float
    zoom: float

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.image_shape)

    @property
    def crop_box(self) -> Box:
        """The crop box in voxels of the original image."""
        return Box(self.crop_start, self.crop_size)

    def affine(self) -> tuple[Tensor, Tensor]:
        """``(A, b)`` as float64 tensors of shapes ``[dims, dims]`` and ``[dims]``."""
        return torch.tensor(self.matrix, dtype=torch.float64), torch.tensor(
            self.offset, dtype=torch.float64
        )

    def index_to_coords(self, index: Tensor) -> Tensor:
        """Original coordinates of view pixel indices ``index[..., dims]`` (float64)."""
        a, b = self.affine()
        return index.to(torch.float64) @ a.T + b

    def coords_to_index(self, coords: Tensor) -> Tensor:
        """View pixel indices (fractional) of original coordinates ``coords[..., dims]``."""
        a, b = self.affine()
        return torch.linalg.solve(a, (coords.to(torch.float64) - b).unsqueeze(-1)).squeeze(-1)

    def coords_grid(self) -> Tensor:
        """Original coordinates of every view pixel, ``Tensor[dims, *out_size]`` (float64)."""
        return _as_channels(self.index_to_coords(_index_grid(self.out_size)))


@dataclass(frozen=True)
class IntensityParams:
    """Drawn intensity augmentation values of one view; the defaults are the identity.

    ``remap`` (the lookup table's knot values, empty = none), ``gamma`` exponent, ``contrast``
    factor, ``brightness`` shift (intensity units), ``blur_sigma`` (view pixels, 0 = none),
    ``noise_std`` (0 = none) and the seed of the noise field, so that replaying gives the same
    noise.
    """

    remap: tuple[float, ...] = ()
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    noise_seed: int = 0


@dataclass
class ViewPair:
    """Two augmented views of one image with their coordinates and parameters.

    ``view1``/``view2``: ``Tensor[C, *V]``; ``coords1``/``coords2``: ``Tensor[dims, *V]``, the
    original voxel coordinates of each view pixel (see the module docstring).
    """

    view1: Tensor
    view2: Tensor
    coords1: Tensor
    coords2: Tensor
    spatial1: SpatialParams
    spatial2: SpatialParams
    intensity1: IntensityParams = field(default_factory=IntensityParams)
    intensity2: IntensityParams = field(default_factory=IntensityParams)


# --- geometry helpers ---------------------------------------------------------------------------


def _index_grid(size: Sequence[int]) -> Tensor:
    """Pixel indices ``Tensor[*size, dims]`` (float64), last axis ordered like ``size``."""
    axes = [torch.arange(n, dtype=torch.float64) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _as_channels(points: Tensor) -> Tensor:
    """``[*V, dims]`` -> ``[dims, *V]``."""
    return points.movedim(-1, 0)


def _in_range(points: Tensor, low: Sequence[float], high: Sequence[float]) -> Tensor:
    """True where every coordinate of ``points[..., dims]`` is within ``[low, high]`` (+- _EPS)."""
    lo = torch.tensor(low, dtype=torch.float64) - _EPS
    hi = torch.tensor(high, dtype=torch.float64) + _EPS
    return ((points >= lo) & (points <= hi)).all(dim=-1)


def _inplane_rotation(ndim: int, radians: float) -> Tensor:
    """Rotation of the last two axes (y, x) by ``radians``: ``[[cos, -sin], [sin, cos]]``."""
    r = torch.eye(ndim, dtype=torch.float64)
    c, s = math.cos(radians), math.sin(radians)
    r[-2:, -2:] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return r


def make_spatial_params(
    image_shape: Sequence[int],
    out_size: Sequence[int],
    crop_start: Sequence[int],
    crop_size: Sequence[int],
    flips: Sequence[bool] | None = None,
    rot90_k: int = 0,
    angle_deg: float = 0.0,
    zoom: float = 1.0,
) -> SpatialParams:
    """Compose explicit spatial augmentation values into one affine map.

    With view pixel ``j`` centred as ``t = j - (V - 1) / 2``:
    ``coords = c + R(angle) S P(k) Flip t / zoom`` where ``Flip`` negates the flipped axes of the
    view, ``P(k)`` is the in-plane rotation by ``k * 90°`` (taking the view frame to the crop
    frame, whose in-plane extents are the view's swapped when ``k`` is odd), ``S`` scales each axis
    by ``(crop_size - 1) / (V' - 1)`` (``V'`` = view size in the crop frame, corner alignment),
    ``R`` is the free in-plane rotation about the crop centre
    ``c = crop_start + (crop_size - 1) / 2``.
    So ``A = R S P Flip / zoom`` and ``b = c - A (V - 1) / 2``.
    """
    image_shape = tuple(int(n) for n in image_shape)
    out_size = tuple(int(v) for v in out_size)
    crop_start = tuple(int(a) for a in crop_start)
    crop_size = tuple(int(e) for e in crop_size)
    ndim = len(image_shape)
    flips = tuple(bool(f) for f in flips) if flips is not None else (False,) * ndim
    if ndim not in (2, 3) or not (len(out_size) == len(crop_start) == len(crop_size) == ndim):
        raise ValueError(
            f"image_shape, out_size, crop_start and crop_size need 2 or 3 entries each: "
            f"{image_shape}, {out_size}, {crop_start}, {crop_size}"
        )
    if len(flips) != ndim:
        raise ValueError(f"flips needs {ndim} entries, got {flips}")
    if min(image_shape) < 2 or min(out_size) < 2 or min(crop_size) < 2:
        raise ValueError(
            "image, view and crop need >= 2 voxels per axis: "
            f"{image_shape}, {out_size}, {crop_size}"
        )
    if zoom <= 0:
        raise ValueError(f"zoom must be > 0, got {zoom}")
    k = int(rot90_k) % 4
    flip = torch.diag(torch.tensor([-1.0 if f else 1.0 for f in flips], dtype=torch.float64))
    quarter = _inplane_rotation(ndim, k * math.pi / 2).round()
    frame_size = quarter.abs() @ torch.tensor(out_size, dtype=torch.float64)
    scale = torch.diag((torch.tensor(crop_size, dtype=torch.float64) - 1) / (frame_size - 1))
    rotation = _inplane_rotation(ndim, math.radians(angle_deg))
    a = rotation @ scale @ quarter @ flip / zoom
    centre = (
        torch.tensor(crop_start, dtype=torch.float64)
        + (torch.tensor(crop_size, dtype=torch.float64) - 1) / 2
    )
    b = centre - a @ ((torch.tensor(out_size, dtype=torch.float64) - 1) / 2)
    return SpatialParams(
        image_shape=image_shape,
        out_size=out_size,
        matrix=tuple(tuple(float(v) for v in row) for row in a.tolist()),
        offset=tuple(float(v) for v in b.tolist()),
        crop_start=crop_start,
        crop_size=crop_size,
        flips=flips,
        rot90_k=k,
        angle_deg=float(angle_deg),
        zoom=float(zoom),
    )


# --- sampling -----------------------------------------------------------------------------------


def _crop_extents(shape: tuple[int, ...], fraction: float, ratio: float) -> tuple[int, ...]:
    """Crop extents (voxels, rounded) covering ``fraction`` of ``shape`` with in-plane ``ratio``."""
    leading = [n * fraction ** (1 / len(shape)) for n in shape[:-2]]
    area = (
        fraction * math.prod(shape) / math.prod(leading) if leading else fraction * math.prod(shape)
    )
    extents = [*leading, math.sqrt(area / ratio), math.sqrt(area * ratio)]
    return tuple(int(round(e)) for e in extents)


def _sample_crop(
    shape: tuple[int, ...], spec: ViewSpec, generator: torch.Generator
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Random resized crop (torchvision's algorithm, in 2D or 3D): ``(start, size)`` in voxels.

    Up to ``_CROP_ATTEMPTS`` draws of (fraction, ratio) are tried; a draw is accepted when its
    rounded extents fit in the image, are >= 2 voxels and cover a fraction within ``spec.scale``.
    Otherwise the fallback is a crop of the geometric-mean fraction with the image's own aspect.
    """
    total = math.prod(shape)
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    size = None
    for _ in range(_CROP_ATTEMPTS):
        fraction = uniform(generator, *spec.scale)
        ratio = math.exp(uniform(generator, *log_ratio))
        extents = _crop_extents(shape, fraction, ratio)
        fits = all(2 <= e <= n for e, n in zip(extents, shape, strict=True))
        if fits and spec.scale[0] <= math.prod(extents) / total <= spec.scale[1]:
            size = extents
            break
    if size is None:
        per_axis = math.sqrt(spec.scale[0] * spec.scale[1]) ** (1 / len(shape))
        size = tuple(min(n, max(2, int(round(n * per_axis)))) for n in shape)
    start = tuple(randint(generator, 0, n - e) for n, e in zip(shape, size, strict=True))
    return start, size


def sample_spatial(
    image_shape: Sequence[int], spec: ViewSpec, generator: torch.Generator
) -> SpatialParams:
    """Draw one view's spatial augmentation for an image of spatial shape ``image_shape``.

    Order of draws: crop, flips (one per axis), rot90 (apply, k), angle, zoom. Every value after
    the crop is drawn even when its probability is 0, so changing a probability or range does
    not shift the other draws.
    """
    shape = tuple(int(n) for n in image_shape)
    if len(shape) != len(spec.size):
        raise ValueError(f"spec.size {spec.size} does not match the image's spatial shape {shape}")
    if min(shape) < 2:
        raise ValueError(f"images need >= 2 voxels per axis, got spatial shape {shape}")
    start, size = _sample_crop(shape, spec, generator)
    flips = tuple(uniform(generator, 0.0, 1.0) < spec.flip_prob for _ in shape)
    rotate90 = uniform(generator, 0.0, 1.0) < spec.rot90_prob
    k = randint(generator, 1, 3)
    angle = uniform(generator, -spec.max_rotation_deg, spec.max_rotation_deg)
    zoom = uniform(generator, *spec.zoom)
    return make_spatial_params(
        shape, spec.size, start, size, flips, k if rotate90 else 0, angle, zoom
    )


def sample_intensity(spec: ViewSpec, generator: torch.Generator) -> IntensityParams:
    """Draw one view's intensity augmentation.

    Per operation (gamma, contrast, brightness, blur, noise) one draw decides whether it applies
    and one draws its value (the noise seed for noise), whether it applies or not, so changing one
    setting does not shift the others' draws. The lookup table is drawn last and only when
    ``remap_prob > 0``, so views without it are the ones drawn before it existed.
    """

    def draw(prob: float, low: float, high: float, identity: float) -> float:
        applied = uniform(generator, 0.0, 1.0) < prob
        value = uniform(generator, low, high)
        return value if applied else identity

    gamma = draw(spec.gamma_prob, *spec.gamma, identity=1.0)
    contrast = draw(spec.contrast_prob, *spec.contrast, identity=1.0)
    brightness = draw(spec.brightness_prob, -spec.brightness, spec.brightness, identity=0.0)
    blur_sigma = draw(spec.blur_prob, *spec.blur_sigma, identity=0.0)
    noise = uniform(generator, 0.0, 1.0) < spec.noise_prob
    seed = randint(generator, 0, 2**62)
    remap: tuple[float, ...] = ()
    if spec.remap_prob > 0:
        applied = uniform(generator, 0.0, 1.0) < spec.remap_prob
        table = augment.random_lookup_table(generator, spec.remap_knots)
        remap = table if applied else ()
    return IntensityParams(
        remap=remap,
        gamma=gamma,
        contrast=contrast,
        brightness=brightness,
        blur_sigma=blur_sigma,
        noise_std=spec.noise_std if noise else 0.0,
        noise_seed=seed if noise else 0,
    )


# --- applying -----------------------------------------------------------------------------------


def _normalise(points: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Index coordinates ``[..., dims]`` -> grid_sample coordinates, last axis reversed."""
    n = torch.tensor(size, dtype=torch.float64)
    g = 2 * points / (n - 1) - 1 if align_corners else (2 * points + 1) / n - 1
    return g.flip(-1)


def apply_spatial(
    image: Tensor, params: SpatialParams, mode: str = "bilinear"
) -> tuple[Tensor, Tensor]:
    """Resample ``image[C, *S]`` into the view described by ``params``.

    Returns ``(view[C, *V], coords[dims, *V])``: the view sampled with
    ``F.grid_sample(mode=mode, align_corners=True, padding_mode="zeros")`` (``"bilinear"`` is
    trilinear in 3D; use ``"nearest"`` for label maps, which keeps integer dtypes), and the original
    voxel coordinates of each view pixel (dtype of a floating image, else float32). Pixels whose
    coordinates fall outside the image are zero (partially, within one voxel of the border).
    """
    if tuple(image.shape[1:]) != params.image_shape:
        raise ValueError(
            f"image spatial shape {tuple(image.shape[1:])} differs from the parameters' "
            f"{params.image_shape}"
        )
    floating = image.is_floating_point()
    if not floating and mode != "nearest":
        raise ValueError(f"integer images (labels) need mode='nearest', got mode='{mode}'")
    dtype = image.dtype if floating else torch.float32
    coords = params.index_to_coords(_index_grid(params.out_size))
    grid = _normalise(coords, params.image_shape, align_corners=True).to(image.device, dtype)
    view = F.grid_sample(
        image[None].to(dtype), grid[None], mode=mode, padding_mode="zeros", align_corners=True
    )[0]
    return view.to(image.dtype), _as_channels(coords).to(image.device, dtype)


def apply_intensity(view: Tensor, params: IntensityParams) -> Tensor:
    """Apply drawn intensity values to ``view[C, *V]``: lookup table, gamma, contrast, brightness,
    blur, noise.

    Uses the primitives of :mod:`medssl_kit.data.augment`; identity values are skipped. The noise
    field comes from a fresh generator seeded with ``params.noise_seed``, so replays match.
    No operation moves a pixel: all are pointwise except the blur, whose kernel is symmetric.
    """
    out = view
    if params.remap:
        out = augment.intensity_lookup(out, params.remap)
    if params.gamma != 1.0:
        out = augment.gamma(out, params.gamma)
    if params.contrast != 1.0:
        out = augment.contrast(out, params.contrast)
    if params.brightness != 0.0:
        out = augment.brightness(out, params.brightness)
    if params.blur_sigma > 0:
        out = augment.gaussian_blur(out, params.blur_sigma)
    if params.noise_std > 0:
        noise_generator = torch.Generator().manual_seed(params.noise_seed)
        out = augment.gaussian_noise(out, noise_generator, params.noise_std)
    return out


def build_view_pair(
    image: Tensor,
    spatial1: SpatialParams,
    spatial2: SpatialParams,
    intensity1: IntensityParams | None = None,
    intensity2: IntensityParams | None = None,
) -> ViewPair:
    """A :class:`ViewPair` of ``image`` from explicit parameters (None: identity intensity)."""
    intensity1 = intensity1 or IntensityParams()
    intensity2 = intensity2 or IntensityParams()
    view1, coords1 = apply_spatial(image, spatial1)
    view2, coords2 = apply_spatial(image, spatial2)
    return ViewPair(
        view1=apply_intensity(view1, intensity1),
        view2=apply_intensity(view2, intensity2),
        coords1=coords1,
        coords2=coords2,
        spatial1=spatial1,
        spatial2=spatial2,
        intensity1=intensity1,
        intensity2=intensity2,
    )


def sample_view_pair(
    image: Tensor, spec: ViewSpec | tuple[ViewSpec, ViewSpec], generator: torch.Generator
) -> ViewPair:
    """Two independently augmented views of ``image[C, *S]`` (DESIGN §2.5).

    ``spec`` is one spec for both views or one per view. Draw order: spatial 1, spatial 2,
    intensity 1, intensity 2 (so the spatial draws do not depend on the intensity settings).
    """
    spec1, spec2 = spec if isinstance(spec, tuple) else (spec, spec)
    shape = tuple(image.shape[1:])
    spatial1 = sample_spatial(shape, spec1, generator)
    spatial2 = sample_spatial(shape, spec2, generator)
    intensity1 = sample_intensity(spec1, generator)
    intensity2 = sample_intensity(spec2, generator)
    return build_view_pair(image, spatial1, spatial2, intensity1, intensity2)


def replay(pair: ViewPair, image: Tensor) -> ViewPair:
    """Apply ``pair``'s spatial and intensity parameters (noise seeds included) to ``image``.

    ``image`` must have the spatial shape of the image ``pair`` came from; the result has the
    same coordinates as ``pair`` (the pixel-global context stabilizer, DESIGN §4.1).
    """
    return build_view_pair(image, pair.spatial1, pair.spatial2, pair.intensity1, pair.intensity2)


def correspondence(
    pair: ViewPair, feature_size: Sequence[int] | None = None, align_corners: bool = True
) -> tuple[Tensor, Tensor]:
    """Where each view-1 location lies in view 2 (DESIGN §2.5).

    Args:
        pair: the two views.
        feature_size: spatial size of the view-1 map the grid is for (default: the view-1 size).
        align_corners: how feature pixels sit on view pixels (see the module docstring); pass the
            same value to ``F.grid_sample``.

    Returns:
        ``grid``: ``Tensor[*feature_size, dims]`` in view 2's dtype, last axis ``(x, y[, z])``,
        normalised to [-1, 1] against view 2, so that
        ``F.grid_sample(feat2[None], grid[None], align_corners=align_corners)[0]`` aligns view-2
        features (of any resolution) with the view-1 map.
        ``valid``: ``bool Tensor[*feature_size]``, True where the view-1 location's anatomical
        point lies inside the original image (``[0, n - 1]`` per axis) and inside view 2
        (``[0, V2 - 1]`` with ``align_corners=True``; the pixel footprint ``[-0.5, V2 - 0.5]``
        with ``align_corners=False``, where sampling at the rim is best done with
        ``padding_mode="border"``). A ``valid`` point next to view-2 pixels that are themselves
        outside the image (rotated corners, zoom-out) mixes in their zero padding.
    """
    s1, s2 = pair.spatial1, pair.spatial2
    v1 = torch.tensor(s1.out_size, dtype=torch.float64)
    size = tuple(int(f) for f in (feature_size if feature_size is not None else s1.out_size))
    if len(size) != s1.ndim or min(size) < (2 if align_corners else 1):
        raise ValueError(
            f"feature_size must have {s1.ndim} entries >= {2 if align_corners else 1}, got {size}"
        )
    q = _index_grid(size)
    f = torch.tensor(size, dtype=torch.float64)
    p1 = q * (v1 - 1) / (f - 1) if align_corners else (q + 0.5) * v1 / f - 0.5
    coords = s1.index_to_coords(p1)
    p2 = s2.coords_to_index(coords)
    in_image = _in_range(coords, [0.0] * s1.ndim, [n - 1.0 for n in s1.image_shape])
    rim = 0.0 if align_corners else 0.5
    in_view2 = _in_range(p2, [-rim] * s2.ndim, [v - 1.0 + rim for v in s2.out_size])
    grid = _normalise(p2, s2.out_size, align_corners)
    dtype = pair.view2.dtype if pair.view2.is_floating_point() else torch.float32
    return grid.to(pair.view2.device, dtype), (in_image & in_view2).to(pair.view2.device)


# --- PCRLv2 multi-crop (2D) and sub-crop (3D) ---------------------------------------------------


def multi_crop(
    image2d: Tensor,
    global_spec: ViewSpec,
    local_spec: ViewSpec,
    n_local: int,
    generator: torch.Generator,
) -> list[tuple[Tensor, Tensor, SpatialParams]]:
    """PCRLv2 2D multi-crop: 2 global views and ``n_local`` local views of ``image2d[C, H, W]``.

    PCRLv2 uses global scale (0.3, 1) and local scale (0.05, 0.3) (both views resized to 224² in
    the paper); set them in the specs. Returns ``(view, coords, params)`` per view, globals first.
    Only the spatial part of the specs is used: the views are un-corrupted, because PCRLv2
    restores them; the method applies its local (corrupting) augmentation itself.
    """
    if image2d.ndim != 3:
        raise ValueError(f"multi_crop takes a 2D image [C, H, W], got shape {tuple(image2d.shape)}")
    shape = tuple(image2d.shape[1:])
    specs = [global_spec] * 2 + [local_spec] * n_local
    out = []
    for spec in specs:
        params = sample_spatial(shape, spec, generator)
        view, coords = apply_spatial(image2d, params)
        out.append((view, coords, params))
    return out


# PCRLv2 sub-crop sizes, converted from the paper's (x, y, z) to (D, H, W).
PCRLV2_GLOBAL_SIZES: tuple[tuple[int, int, int], ...] = (
    (32, 64, 64),
    (64, 96, 96),
    (96, 96, 96),
    (64, 112, 112),
)
PCRLV2_GLOBAL_OUT: tuple[int, int, int] = (32, 64, 64)
PCRLV2_LOCAL_SIZES: tuple[tuple[int, int, int], ...] = (
    (8, 8, 8),
    (16, 16, 16),
    (16, 32, 32),
    (32, 32, 32),
)
PCRLV2_LOCAL_OUT: tuple[int, int, int] = (16, 16, 16)


@dataclass
class SubCrop:
    """Result of :func:`sub_crop`. Views ``Tensor[C, *out]``, coords ``Tensor[3, *out]``.

    ``global_boxes``/``local_boxes`` are the crop boxes in voxels of the volume (before flips and
    rotation), ``bounding_box`` the minimum box around the two global boxes, ``iou`` their IoU.
    """

    global_views: list[Tensor]
    global_coords: list[Tensor]
    global_params: list[SpatialParams]
    global_boxes: list[Box]
    local_views: list[Tensor]
    local_coords: list[Tensor]
    local_params: list[SpatialParams]
    local_boxes: list[Box]
    bounding_box: Box
    iou: float


def _clamp_size(size: Sequence[int], bound: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(2, min(int(s), int(b))) for s, b in zip(size, bound, strict=True))


def _random_box(sizes: Sequence[Sequence[int]], bound: Box, generator: torch.Generator) -> Box:
    """A box of a size drawn from ``sizes`` (clamped to ``bound``) placed uniformly in ``bound``."""
    size = _clamp_size(sizes[randint(generator, 0, len(sizes) - 1)], bound.size)
    start = tuple(
        a + randint(generator, 0, n - e)
        for a, n, e in zip(bound.start, bound.size, size, strict=True)
    )
    return Box(start, size)


def sub_crop(
    volume: Tensor,
    generator: torch.Generator,
    global_sizes: Sequence[Sequence[int]] = PCRLV2_GLOBAL_SIZES,
    global_out: Sequence[int] = PCRLV2_GLOBAL_OUT,
    iou_min: float = 0.3,
    local_sizes: Sequence[Sequence[int]] = PCRLV2_LOCAL_SIZES,
    local_out: Sequence[int] = PCRLV2_LOCAL_OUT,
    n_local: int = 6,
    max_tries: int = 100,
    flip_prob: float = 0.5,
    max_rotation_deg: float = 10.0,
) -> SubCrop:
    """PCRLv2 3D sub-crop of ``volume[C, D, H, W]``.

    Sizes are ``(D, H, W)`` voxels. The defaults are the paper's, converted from its (x, y, z):
    global crops {64²×32, 96²×64, 96³, 112²×64} resized to 64²×32, local crops
    {8³, 16³, 32²×16, 32³} resized to 16³.

    1. Two global boxes, each of a size drawn from ``global_sizes``, placed uniformly in the
       volume, redrawn (both) until their IoU >= ``iou_min``; after ``max_tries`` failed draws a
       :class:`~medssl_kit.errors.MedsslError` says what to change.
    2. ``n_local`` local boxes, each of a size drawn from ``local_sizes``, placed uniformly inside
       the minimum bounding box of the two global boxes.
    3. Global boxes are resized to ``global_out`` with the PCRLv2 3D global augmentation (random
       flip per axis with ``flip_prob``, and a small in-plane rotation up to ``max_rotation_deg``
       standing in for TorchIO's random affine); local boxes are resized to ``local_out`` as is.

    A size larger than the volume (or the bounding box, for local crops) is clamped per axis to
    it: at the ``cpu`` profile (48×128×128) every global crop spans all 48 slices, and at ``smoke``
    (16×64×64) every global crop is the whole volume (IoU 1).
    """
    if volume.ndim != 4:
        raise ValueError(f"sub_crop takes a 3D volume [C, D, H, W], got {tuple(volume.shape)}")
    shape = tuple(volume.shape[1:])
    if min(shape) < 2:
        raise MedsslError(f"sub_crop needs >= 2 voxels per axis, got volume shape {shape}")
    whole = Box((0, 0, 0), shape)
    iou = -1.0
    for _ in range(max_tries):
        box1 = _random_box(global_sizes, whole, generator)
        box2 = _random_box(global_sizes, whole, generator)
        iou = box1.iou(box2)
        if iou >= iou_min:
            break
    else:
        raise MedsslError(
            f"sub_crop: no pair of global crops with IoU >= {iou_min} in {max_tries} tries for a "
            f"volume of shape {shape} (last IoU {iou:.3f}); lower iou_min, use global sizes "
            "closer to the volume size, or raise max_tries"
        )
    bbox = box1.bounding_box(box2)
    global_params = []
    for box in (box1, box2):
        flips = tuple(uniform(generator, 0.0, 1.0) < flip_prob for _ in shape)
        angle = uniform(generator, -max_rotation_deg, max_rotation_deg)
        global_params.append(
            make_spatial_params(shape, global_out, box.start, box.size, flips, 0, angle)
        )
    local_boxes = [_random_box(local_sizes, bbox, generator) for _ in range(n_local)]
    local_params = [
        make_spatial_params(shape, local_out, box.start, box.size) for box in local_boxes
    ]
    global_pairs = [apply_spatial(volume, p) for p in global_params]
    local_pairs = [apply_spatial(volume, p) for p in local_params]
    return SubCrop(
        global_views=[v for v, _ in global_pairs],
        global_coords=[c for _, c in global_pairs],
        global_params=global_params,
        global_boxes=[box1, box2],
        local_views=[v for v, _ in local_pairs],
        local_coords=[c for _, c in local_pairs],
        local_params=local_params,
        local_boxes=local_boxes,
        bounding_box=bbox,
        iou=iou,
    )


# --- vox2vec: two overlapping crops and their shared voxels -------------------------------------


def overlapping_crops(
    image: Tensor, size: Sequence[int], generator: torch.Generator, body: Tensor | None = None
) -> ViewPair:
    """Two crops of ``size`` voxels of ``image[C, *S]`` that share at least one body voxel
    (vox2vec's views, DESIGN §4.5).

    An anchor voxel is drawn uniformly from ``body`` (``bool [*S]``; ``None`` or empty: every
    voxel), then each crop's start is drawn uniformly, per axis, among the starts whose crop
    holds the anchor. The crops are not resized, flipped or rotated: each view is an integer
    translation of the image, so a voxel of one view is a voxel of the other (no interpolation).
    Intensities are untouched (identity :class:`IntensityParams`). Raises ``MedsslError`` when
    the image is smaller than ``size``.
    """
    shape = tuple(int(n) for n in image.shape[1:])
    size = tuple(int(s) for s in size)
    if len(size) != len(shape) or any(s > n for s, n in zip(size, shape, strict=True)):
        raise MedsslError(f"crops of {list(size)} voxels do not fit an image of {list(shape)}")
    candidates = body.nonzero() if body is not None else None
    if candidates is None or len(candidates) == 0:
        anchor = [randint(generator, 0, n - 1) for n in shape]
    else:
        anchor = candidates[randint(generator, 0, len(candidates) - 1)].tolist()
    params = []
    for _ in range(2):
        start = [
            randint(generator, max(0, a - s + 1), min(a, n - s))
            for a, s, n in zip(anchor, size, shape, strict=True)
        ]
        params.append(make_spatial_params(shape, size, start, size))
    return build_view_pair(image, params[0], params[1])


def shared_voxels(
    pair: ViewPair, mask1: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Up to ``n`` positive pairs of ``pair``: view-1 voxels where ``mask1`` (``bool [*V1]``) is
    True whose point lies in view 2, drawn without replacement.

    Returns ``(index1, index2)``, ``float32 [m, dims]`` view voxel indices (ordered like the
    spatial axes) of the same physical points, ``m = min(n, candidates)``, in drawing order.
    ``index2`` comes from the views' affine maps (:class:`SpatialParams`), so it is exact; for
    :func:`overlapping_crops` both are whole numbers.
    """
    _, valid = correspondence(pair)
    candidates = (valid.cpu() & mask1.cpu()).nonzero()
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
    index2 = pair.spatial2.coords_to_index(pair.spatial1.index_to_coords(chosen))
    return chosen.float(), index2.float()
