"""Geometry helpers: implicit shapes and smooth random fields in millimetres.

All coordinates in mm; X toward the patient's right, Y anterior, Z superior.
"""

from __future__ import annotations

import numpy as np


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles in radians about the X, Y and Z axes."""
    c, s = np.cos([ax, ay, az]), np.sin([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def _local(P, centre, rot: np.ndarray | None = None):
    """Coordinates of points ``P = (X, Y, Z)`` in a frame at ``centre`` rotated by ``rot``."""
    d = [P[i] - float(centre[i]) for i in range(3)]
    if rot is None:
        return d
    r = [[float(v) for v in row] for row in rot]
    return [r[0][k] * d[0] + r[1][k] * d[1] + r[2][k] * d[2] for k in range(3)]


def _ellipsoid(P, centre, semi, rot: np.ndarray | None = None):
    """Normalised squared radius of points in an ellipsoid (< 1 inside); semi-axes in mm."""
    u = _local(P, centre, rot)
    return (u[0] / semi[0]) ** 2 + (u[1] / semi[1]) ** 2 + (u[2] / semi[2]) ** 2


def _capsule(P, a, b, radius: float):
    """Points within ``radius`` mm of the segment from ``a`` to ``b``."""
    ab = [float(b[i] - a[i]) for i in range(3)]
    d = [P[i] - float(a[i]) for i in range(3)]
    t = np.clip(
        (d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / max(sum(v * v for v in ab), 1e-6), 0, 1
    )
    return sum((d[i] - t * ab[i]) ** 2 for i in range(3)) < radius**2


def _soft_union(f1, f2, k: float):
    """Smooth minimum of two implicit functions (rounded union of two shapes)."""
    return np.minimum(f1, f2) - k * np.log1p(np.exp(-np.abs(f1 - f2) / k))


def _frac(a):
    """Fractional part (for periodic structures: ribs, vertebral levels)."""
    return a - np.floor(a)


class _Lattice:
    """A smooth random field in physical space: Gaussian bumps of width ``width`` mm on a cubic
    lattice of ``step`` mm with standard-normal weights, normalised to about unit variance.

    The lattice is fixed in millimetres (a box of +-``extent`` mm; the field fades to 0 outside),
    so it does not depend on how it is sampled; on a voxel grid it is evaluated separably.
    """

    def __init__(self, rng: np.random.Generator, step: float, width: float, extent: float = 300.0):
        n = int(2 * extent / step) + 1
        self.nodes = (-extent + step * np.arange(n)).astype(np.float32)
        self.coef = rng.standard_normal((n, n, n), dtype=np.float32)  # (z, y, x)
        self.width = width
        self.scale = float((np.sqrt(np.pi) * width / step) ** -1.5)

    def _basis(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        near = np.flatnonzero(
            (self.nodes > coords.min() - 4 * self.width)
            & (self.nodes < coords.max() + 4 * self.width)
        )
        b = np.exp(-((coords[:, None] - self.nodes[None, near]) ** 2) / (2 * self.width**2))
        return near, b.astype(np.float32)

    def on_grid(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The field on the grid of axis coordinates ``z``, ``y``, ``x`` (mm), as ``(D, H, W)``."""
        iz, bz = self._basis(z)
        iy, by = self._basis(y)
        ix, bx = self._basis(x)
        # Separable contraction; einsum without BLAS is fast here and does not depend on the
        # BLAS thread pool (threaded BLAS is slower than this on small products).
        a = np.einsum("klm,wm->klw", self.coef[np.ix_(iz, iy, ix)], bx, optimize=False)
        a = np.einsum("klw,hl->khw", a, by, optimize=False)
        out = np.einsum("khw,dk->dhw", a, bz, optimize=False)
        return out * np.float32(self.scale)
