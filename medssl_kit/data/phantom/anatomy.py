"""Anatomy: every parameter of one patient, and the shapes as functions of mm coordinates."""

from __future__ import annotations

import numpy as np

from medssl_kit.data.phantom.geometry import (
    _capsule,
    _ellipsoid,
    _Lattice,
    _local,
    _rotation,
    _soft_union,
)
from medssl_kit.data.phantom.tissues import Tissue

_T = Tissue


class _Anatomy:
    """Random anatomy of one case. All lengths in mm in the patient frame (origin: body centre)."""

    def __init__(self, rng: np.random.Generator):
        def u(a: float, b: float) -> float:
            return float(rng.uniform(a, b))

        # Body: the abdominal cavity is a superellipse (posterior and anterior half-axes differ);
        # muscle and subcutaneous fat are layers around it whose thickness depends on direction.
        self.cx, self.cya, self.cyp = u(104, 138), u(66, 96), u(74, 92)
        self.power, self.taper = u(2.1, 2.7), u(-0.03, 0.06)
        self.m_lat, self.m_ant, self.m_post = u(9, 15), u(6, 10), u(8, 12)
        self.m_rectus = u(3, 8)  # extra thickness of the rectus muscles beside the midline
        # Habitus: subcutaneous fat from cachectic (anterior ~4 mm) to obese (~75 mm); the
        # skewed draw makes lean-to-overweight patients the most common.
        self.obesity = float(rng.beta(1.6, 2.0))
        ob = self.obesity
        self.f_lat = min(4 + 52 * ob, 205 - 1.06 * self.cx - self.m_lat)
        self.f_ant = min(4 + 72 * ob, 185 - self.cya - self.m_ant)
        self.f_post = min(3 + 30 * ob, 160 - self.cyp - self.m_post)
        self.disp_sigma = u(2.5, 5.0)
        # Diaphragm domes (Z of the top of the right and left domes).
        self.hr = u(72, 92)
        self.hl = self.hr - u(10, 25)
        # Spine.
        self.vb_a = u(19, 24)
        self.vb_b = 0.78 * self.vb_a
        self.yv = -self.cyp + u(50, 58)
        self.level = u(30, 36)
        self.level0 = u(0, self.level)
        # Vessels.
        self.ao_r = u(9, 12.5)
        self.ao_x = -u(6, 14)
        self.ao_y = self.yv + self.vb_b + self.ao_r + u(1, 5)
        self.ivc_x, self.ivc_y = u(16, 26), self.yv + self.vb_b + u(7, 14)
        self.ivc_semi = (u(11, 15), u(7, 10))
        # Liver: right lobe and left lobe ellipsoids joined smoothly, sheared so that the tip of
        # the right lobe is lateral; the dome follows the diaphragm.
        s = u(0.85, 1.15)
        self.liver_r = dict(
            centre=(0.42 * self.cx + u(-6, 6), u(-10, 5), self.hr - 62 + u(-6, 6)),
            semi=(0.3 * (self.cx + 121) * s, 0.22 * (self.cya + self.cyp + 164) * s, 88 * s),
            shear=u(0.15, 0.35),
        )
        self.liver_l = dict(
            centre=(-0.05 * self.cx + u(-8, 8), 0.45 * self.cya, self.hl - 22 + u(-6, 6)),
            semi=(0.38 * self.cx * s * u(0.7, 1.2), 0.4 * self.cya * s, 36 * s),
        )
        # Gallbladder under the liver.
        self.gb = dict(
            centre=(0.22 * self.cx + u(-5, 5), 0.35 * self.cya, self.hr - 112 + u(-8, 8)),
            semi=(16 * u(0.6, 1.1), 16 * u(0.6, 1.1), 32 * u(0.6, 1.2)),
            rot=_rotation(u(-0.4, -0.1), u(0.1, 0.4), 0.0),
        )
        # Spleen: a crescent against the left posterolateral wall.
        ss = u(0.85, 1.15)
        sp_c = np.array([-(self.cx - 27 * ss), -0.3 * self.cyp + u(-6, 6), self.hl - 40 + u(-6, 6)])
        sp_rot = _rotation(0.0, u(-0.1, 0.1), u(-0.8, -0.5))
        self.spleen = dict(centre=sp_c, semi=(25 * ss, 55 * ss, 48 * ss), rot=sp_rot)
        self.spleen_cut = dict(
            centre=sp_c + sp_rot @ np.array([42 * ss, 0.0, 0.0]),
            semi=(24 * ss, 45 * ss, 60 * ss),
            rot=sp_rot,
        )
        # Stomach: upper left, anterior to the spleen, with an air-fluid level.
        st = u(0.7, 1.2)
        self.stomach = dict(
            centre=(-0.38 * self.cx, 0.2 * self.cya, self.hl - 42 + u(-6, 6)),
            semi=(40 * st, 34 * st, 50 * st),
            rot=_rotation(u(-0.2, 0.2), u(-0.3, 0.1), u(-0.3, 0.3)),
            gas_level=u(-0.2, 0.7),
        )
        # Kidneys (left slightly higher than right).
        self.kidneys = []
        zk_left = self.hl - 88 + u(-8, 8)
        size = u(0.85, 1.15)
        for side, zk in ((-1, zk_left), (1, zk_left - u(10, 22))):
            sk = size * u(0.95, 1.05)
            semi = (30 * sk, 21 * sk, 54 * sk)
            centre = np.array([side * (0.38 * self.cx + 18 + u(-5, 5)), self.yv - 2 + u(-5, 5), zk])
            # Frame in which medial is +u (mirrored for the right kidney): hilum turned
            # anteromedially, upper pole tilted medially and posteriorly.
            rot = _rotation(u(0.05, 0.2), -u(0.1, 0.3), u(0.4, 0.7))
            hilum = centre + np.diag([-side, 1, 1]) @ rot @ np.array([0.9 * semi[0], 0, 0])
            self.kidneys.append(dict(side=side, centre=centre, semi=semi, rot=rot, hilum=hilum))
        self.psoas_top, self.psoas_r = zk_left + 40, u(16, 24)
        # Pancreas: head right of the midline, body across the aorta, tail to the splenic hilum.
        zp = zk_left + 38 + u(-6, 6)
        self.pancreas = [
            ((0.2 * self.cx, self.yv + 48, zp - 12), (0.0, self.yv + 58, zp), 15 * u(0.8, 1.2)),
            ((0.0, self.yv + 58, zp), (-0.35 * self.cx, self.yv + 45, zp + 8), 11 * u(0.8, 1.2)),
            (
                (-0.35 * self.cx, self.yv + 45, zp + 8),
                (-0.6 * self.cx, self.yv + 25, zp + 18),
                9 * u(0.8, 1.2),
            ),
        ]
        # Colon: ascending, transverse, descending.
        zb = min(self.hr - 118, self.hl - 80)
        cr = u(15, 22)
        pts = [
            (0.68 * self.cx, -0.1 * self.cyp, -260),
            (0.7 * self.cx, -0.05 * self.cyp, zb),
            (0.4 * self.cx, 0.6 * self.cya, zb + 5),
            (-0.3 * self.cx, 0.6 * self.cya, zb + 10),
            (-0.7 * self.cx, -0.1 * self.cyp, self.hl - 75),
            (-0.72 * self.cx, -0.15 * self.cyp, -260),
        ]
        self.colon = [(pts[i], pts[i + 1], cr) for i in range(len(pts) - 1)]
        self.bowel_top = zb + 12
        # Portal and hepatic veins (inside the liver they are liver vessels).
        hilum = (0.22 * self.cx, self.yv + 45, self.hr - 95)
        ivc_top = (self.ivc_x, self.ivc_y, self.hr - 22)
        self.liver_veins = [
            ((0.05 * self.cx, self.yv + 48, zp), hilum, 6.5),
            (hilum, (0.62 * self.cx, 0.0, self.hr - 80), 5.5),
            (hilum, (-0.15 * self.cx, 0.45 * self.cya, self.hr - 70), 5.0),
            (ivc_top, (0.75 * self.cx, -0.1 * self.cyp, self.hr - 40), 4.5),
            (ivc_top, (0.3 * self.cx, 0.55 * self.cya, self.hr - 45), 4.5),
            (ivc_top, (-0.15 * self.cx, 0.5 * self.cya, self.hr - 35), 4.0),
        ]
        # Renal arteries and veins (the left renal vein passes in front of the aorta).
        self.renal = []
        for k in self.kidneys:
            h, z = k["hilum"], float(k["hilum"][2]) + 4
            self.renal.append((_T.ARTERY, (self.ao_x, self.ao_y, z + 4), tuple(h), 3.0))
            if k["side"] < 0:
                front = (self.ao_x, self.ao_y + self.ao_r + 5, z)
                self.renal.append((_T.VEIN, tuple(h), front, 4.5))
                self.renal.append((_T.VEIN, front, (self.ivc_x, self.ivc_y, z), 4.5))
            else:
                self.renal.append((_T.VEIN, tuple(h), (self.ivc_x, self.ivc_y, z), 4.5))
        # Heart above the left dome.
        self.heart = dict(
            centre=(-0.15 * self.cx, 0.35 * self.cya, self.hl + 48),
            semi=(70 * u(0.9, 1.1), 52, 58),
            rot=_rotation(0.0, 0.0, u(0.4, 0.7)),
        )
        # Ribs: slope down anteriorly; the costal margin is high in front, low behind.
        self.rib_pitch, self.rib_phase, self.rib_slope = u(26, 32), u(0, 30), u(110, 150)
        self.costal_post, self.costal_ant = self.hr - 130 + u(-10, 10), self.hr - 45 + u(-10, 10)
        # Random fields: elastic displacement (coarse) and two fine fields for texture, bowel
        # loops and small vessels.
        self.disp = [_Lattice(rng, 45.0, 40.0) for _ in range(3)]
        self.fine_a = _Lattice(rng, 10.0, 8.0)
        self.fine_b = _Lattice(rng, 10.0, 8.0)
        self.lesions = self._place_lesions(rng)

    def skin(self, z_levels: np.ndarray, n_angles: int = 180) -> np.ndarray:
        """Patient-frame points ``(N, 3)`` (mm) on the skin at the heights ``z_levels``."""
        theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)[None, :]
        c, s = np.cos(theta), np.sin(theta)
        z = np.asarray(z_levels, dtype=float)[:, None] + 0 * theta
        scale = 1 + self.taper * z / 120
        ay = np.where(s > 0, self.cya, self.cyp) * scale
        p = self.power
        wall = (np.abs(c) / (self.cx * scale)) ** p + (np.abs(s) / ay) ** p
        radius = wall ** (-1 / p)
        muscle, fat = self.wall_thickness((radius * c, radius * s, z))
        radius = radius + muscle + fat
        return np.stack([(radius * c).ravel(), (radius * s).ravel(), z.ravel()], axis=1)

    # ---- shapes: each takes P = (X, Y, Z) arrays of any shape in the patient frame ------------

    def cavity_depth(self, P):
        """Signed radial distance (mm) to the abdominal cavity wall: < 0 inside, > 0 outside."""
        px, py, pz = P
        scale = 1 + self.taper * pz / 120
        ay = np.where(py > 0, self.cya, self.cyp) * scale
        rho = (np.abs(px / (self.cx * scale)) ** self.power + np.abs(py / ay) ** self.power) ** (
            1 / self.power
        )
        r = np.sqrt(px**2 + py**2)
        return r * (1 - 1 / np.maximum(rho, 1e-3))

    def wall_thickness(self, P):
        """Muscle and subcutaneous fat thickness (mm) in the direction of each point."""
        px, py, _ = P
        r2 = px**2 + py**2 + 1e-3
        c2, s2 = px**2 / r2, py**2 / r2
        front = py > 0
        rectus = self.m_rectus * np.exp(-(((np.abs(px) - 0.17 * self.cx) / (0.1 * self.cx)) ** 2))
        muscle = self.m_lat * c2 + np.where(front, self.m_ant + rectus, self.m_post) * s2
        fat = self.f_lat * c2 + np.where(front, self.f_ant, self.f_post) * s2
        return muscle, fat

    def diaphragm(self, P):
        """Height Z (mm) of the diaphragm above each (X, Y)."""
        px, py, _ = P
        right = self.hr - ((px - 0.4 * self.cx) ** 2 + (py - 5) ** 2) / 260
        left = self.hl - ((px + 0.4 * self.cx) ** 2 + py**2) / 260
        return np.maximum(right, left)

    def liver(self, P):
        px, py, pz = P
        c, a = self.liver_r["centre"], self.liver_r["semi"]
        xs = px - self.liver_r["shear"] * (c[2] - pz)
        f1 = ((xs - c[0]) / a[0]) ** 2 + ((py - c[1]) / a[1]) ** 2 + ((pz - c[2]) / a[2]) ** 2
        f2 = _ellipsoid(P, self.liver_l["centre"], self.liver_l["semi"])
        return (_soft_union(f1, f2, 0.25) < 1) & (pz < self.diaphragm(P) - 4)

    def gallbladder(self, P):
        return _ellipsoid(P, **self.gb) < 1

    def spleen_shape(self, P):
        return (_ellipsoid(P, **self.spleen) < 1) & (_ellipsoid(P, **self.spleen_cut) > 1)

    def kidney_local(self, P, k):
        px, py, pz = P
        m = -k["side"]  # mirror so that +u points medially for both kidneys
        d = [
            (px - float(k["centre"][0])) * m,
            py - float(k["centre"][1]),
            pz - float(k["centre"][2]),
        ]
        return _local(d, (0, 0, 0), k["rot"])

    def kidney_outer(self, P, k):
        u = self.kidney_local(P, k)
        a = k["semi"]
        return (u[0] / a[0]) ** 2 + (u[1] / a[1]) ** 2 + (u[2] / a[2]) ** 2

    def ivc(self, P):
        px, py, pz = P
        a, b = self.ivc_semi
        return (((px - self.ivc_x) / a) ** 2 + ((py - self.ivc_y) / b) ** 2 < 1) & (
            pz < self.hr - 12
        )

    def aorta(self, P):
        px, py, pz = P
        top = np.clip((pz - 40) / 80, 0, 1)
        xc = self.ao_x - 6 * top
        yc = self.ao_y - 12 * top
        r = self.ao_r * (1 + 0.08 * pz / 120)
        return (px - xc) ** 2 + (py - yc) ** 2 < r**2

    def vertebral_body(self, P):
        px, py, _ = P
        return (px / self.vb_a) ** 2 + ((py - self.yv) / self.vb_b) ** 2

    # ---- lesions ----------------------------------------------------------------------------

    def _liver_interior(self, P):
        """Points of the liver that stay liver after the organs painted over it."""
        ok = self.liver(P) & ~self.gallbladder(P) & ~self.spleen_shape(P) & ~self.ivc(P)
        ok &= ~self.aorta(P) & (self.cavity_depth(P) < -3)
        for p0, p1, r in self.pancreas:
            ok &= ~_capsule(P, p0, p1, r)
        # Spine, paraspinal muscles and psoas.
        ok &= (np.abs(P[0]) > 65) | (P[1] > self.yv + self.vb_b + 3)
        for k in self.kidneys:
            ok &= self.kidney_outer(P, k) > 1.2
        return ok

    def _place_lesions(self, rng: np.random.Generator) -> list[dict]:
        n = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
        c, a = np.array(self.liver_r["centre"]), np.array(self.liver_r["semi"])
        dirs = np.array(
            [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float
        )
        dirs[13] = 0.0
        norms = np.linalg.norm(dirs, axis=1)
        dirs[norms > 0] /= norms[norms > 0, None]
        lesions: list[dict] = []
        for _ in range(n):
            diameter = float(rng.uniform(3.5, 11.0))
            semi = diameter / 2 * rng.uniform(0.88, 1.12, size=3)
            delta = float(rng.uniform(15, 40)) * (-1.0 if rng.uniform() < 0.7 else 1.0)
            centres = c + rng.uniform(-0.8, 0.8, size=(200, 3)) * a
            pts = centres[:, None, :] + (semi.max() + 5.0) * dirs[None, :, :]
            inside = self._liver_interior((pts[..., 0], pts[..., 1], pts[..., 2])).all(axis=1)
            for i in np.flatnonzero(inside):
                far = all(
                    np.linalg.norm(centres[i] - les["centre"]) > les["semi"].max() + semi.max() + 5
                    for les in lesions
                )
                if far:
                    lesions.append(dict(centre=centres[i], semi=semi, delta=delta))
                    break
        return lesions
