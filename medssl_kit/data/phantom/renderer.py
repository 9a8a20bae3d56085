"""Rendering an anatomy's tissue map on a voxel grid."""

from __future__ import annotations

import numpy as np

from medssl_kit.data.phantom.anatomy import _Anatomy
from medssl_kit.data.phantom.geometry import _capsule, _ellipsoid, _frac
from medssl_kit.data.phantom.tissues import Tissue

_T = Tissue


class _Renderer:
    """Paints the tissue map of an anatomy on a scanner grid (scanner mm coordinates per axis).

    ``rot`` and ``shift`` place the patient in the scanner: the patient-frame position of a voxel
    at scanner coordinates ``s`` (mm, origin at the centre of the reconstructed volume) is
    ``rot @ s + shift`` (plus the anatomy's elastic displacement).
    """

    def __init__(
        self,
        anat: _Anatomy,
        shape: tuple[int, int, int],
        spacing: tuple[float, ...],
        rot: np.ndarray,
        shift: np.ndarray,
        table_y: float | None = None,
    ):
        self.anat, self.shape, self.spacing = anat, shape, spacing
        self.rot, self.shift, self.table_y = rot, shift, table_y
        # Scanner coordinates of voxel centres, mm, (z, y, x); origin at the centre of the FOV.
        self.axes = [
            ((np.arange(n) + 0.5 - n / 2) * s).astype(np.float32)
            for n, s in zip(shape, spacing, strict=True)
        ]
        z, y, x = self.axes
        d = [f.on_grid(z, y, x) * np.float32(anat.disp_sigma) for f in anat.disp]
        self.dmax = float(max(np.abs(v).max() for v in d)) + 2.0
        r = [[float(v) for v in row] for row in rot]
        zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
        # Patient-frame coordinates of every voxel: rotation + shift + elastic displacement.
        self.P = tuple(
            r[i][0] * xx + r[i][1] * yy + r[i][2] * zz + np.float32(shift[i]) + d[i]
            for i in range(3)
        )
        self.fa = anat.fine_a.on_grid(z, y, x)
        self.fb = anat.fine_b.on_grid(z, y, x)
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel slices (z, y, x) covering the patient-frame box [lo, hi] (mm), or None if empty."""
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        scan = (corners - self.shift) @ self.rot  # inverse rotation, row vectors
        slices = []
        for axis, k in zip(range(3), (2, 1, 0), strict=True):  # array axis 0 is z (patient index 2)
            n, s = self.shape[axis], self.spacing[axis]
            first = float(self.axes[axis][0])
            i0 = int(np.floor((scan[:, k].min() - self.dmax - first) / s))
            i1 = int(np.ceil((scan[:, k].max() + self.dmax - first) / s)) + 1
            i0, i1 = max(i0, 0), min(i1, n)
            if i0 >= i1:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def sub(self, sl):
        return tuple(p[sl] for p in self.P)

    def paint(self, sl, mask, code: Tissue) -> None:
        self.tissue[sl][mask] = code

    def render(self) -> tuple[np.ndarray, list[tuple]]:
        a, t, P = self.anat, self.tissue, self.P
        depth = a.cavity_depth(P)
        muscle, fat = a.wall_thickness(P)
        cavity = depth < 0
        t[depth < muscle + fat] = _T.SUBCUTANEOUS_FAT
        wall = (depth >= 0) & (depth < muscle) & ~((P[1] > 0) & (np.abs(P[0]) < 3))
        t[wall] = _T.MUSCLE
        t[cavity] = _T.VISCERAL_FAT
        self._ribs(depth, muscle)
        self._thorax(cavity)
        self._bowel(cavity)
        self._organs(cavity)
        self._spine(depth, muscle)
        self._table()
        return t, self._lesions()

    def _table(self) -> None:
        """The scanner couch (fixed to the scanner, not the patient): two curved carbon-fibre
        shells 45 mm apart around a foam core (air), top surface at ``table_y`` (scanner mm)."""
        if self.table_y is None:
            return
        _, y, x = self.axes
        xx, yy = x[None, :], y[:, None]
        curve = xx**2 / 2000.0
        top = yy - (self.table_y + curve)
        bottom = yy - (self.table_y - 45 + 0.5 * curve)
        shell = ((top > -4) & (top <= 0)) | ((bottom > -4) & (bottom <= 0))
        side = (np.abs(np.abs(xx) - 215) < 2) & (top <= 0) & (bottom > 0)
        couch = (shell & (np.abs(xx) < 215)) | side
        t = self.tissue
        t[(t == _T.SUBCUTANEOUS_FAT) & (top <= 0)[None]] = _T.AIR  # fat pressed on the couch
        t[(t == _T.AIR) & couch[None]] = _T.TABLE

    def _ribs(self, depth, muscle) -> None:
        a = self.anat
        px, py, pz = self.P
        phi = np.abs(np.arctan2(px, -py)) / np.pi  # 0 behind, 1 in front
        band = (depth > 1) & (depth < np.minimum(muscle, 10.0) + 1)
        costal = pz > a.costal_post + (a.costal_ant - a.costal_post) * phi**1.5
        level = _frac((pz + a.rib_slope * phi - a.rib_phase) / a.rib_pitch) < 10 / a.rib_pitch
        ribs = band & costal & level & (phi > 0.12) & (np.abs(px) > 15)
        self.tissue[ribs] = _T.RIB

    def _thorax(self, cavity) -> None:
        a = self.anat
        sl = self.box((-200, -200, min(a.hr, a.hl) - 75), (200, 200, 400))
        if sl is None:
            return
        P = self.sub(sl)
        px, py, pz = P
        cav = cavity[sl]
        zd = a.diaphragm(P)
        above = cav & (pz > zd)
        # Diaphragm: a 4 mm muscle dome.
        self.paint(sl, cav & (pz > zd - 4) & ~above, _T.MUSCLE)
        heart_f = _ellipsoid(P, **a.heart)
        heart = above & (heart_f < 1) & (pz > zd + 6)
        mediastinum = (np.abs(px - 0.5 * a.ao_x) < 28) & (py > a.yv - 28)
        lung = above & (heart_f > 1.3) & ~mediastinum & (a.vertebral_body(P) > 2.5)
        self.paint(sl, lung, _T.LUNG)
        vessel = (np.abs(self.fa[sl]) < 0.15) & (np.abs(self.fb[sl]) < 0.15)
        self.paint(sl, lung & vessel, _T.LUNG_VESSEL)
        self.paint(sl, heart, _T.HEART_WALL)
        self.paint(sl, heart & (heart_f < 0.65), _T.HEART_BLOOD)

    def _bowel(self, cavity) -> None:
        a = self.anat
        sl = self.box((-200, a.yv, -400), (200, 200, a.bowel_top + 10))
        if sl is not None:
            P = self.sub(sl)
            fa, fb = self.fa[sl], self.fb[sl]
            terr = cavity[sl] & (P[2] < a.bowel_top + 8 * fa) & (P[1] > a.yv + 10 + 8 * fb)
            wall = terr & (fa > -0.25)
            self.paint(sl, wall, _T.BOWEL_WALL)
            self.paint(sl, terr & (fa > 0.05), _T.BOWEL_CONTENT)
            self.paint(sl, terr & (fa > 0.3) & (fb > 1.2), _T.BOWEL_GAS)
        for p0, p1, r in a.colon:
            sl = self._capsule_box(p0, p1, r)
            if sl is None:
                continue
            P = self.sub(sl)
            inner = _capsule(P, p0, p1, r - 3) & cavity[sl]
            self.paint(sl, _capsule(P, p0, p1, r) & cavity[sl], _T.BOWEL_WALL)
            self.paint(sl, inner, _T.COLON_CONTENT)
            self.paint(sl, inner & (self.fb[sl] > 0.3), _T.BOWEL_GAS)

    def _capsule_box(self, p0, p1, r):
        lo = np.minimum(p0, p1) - r
        hi = np.maximum(p0, p1) + r
        return self.box(lo, hi)

    def _ellipsoid_box(self, centre, semi):
        m = max(semi)
        return self.box(np.asarray(centre) - m, np.asarray(centre) + m)

    def _organs(self, cavity) -> None:
        a = self.anat
        # Stomach with wall, content and an air-fluid level (gas anterior: the patient is supine).
        st = a.stomach
        sl = self._ellipsoid_box(st["centre"], st["semi"])
        if sl is not None:
            P = self.sub(sl)
            below = cavity[sl] & (P[2] < a.diaphragm(P) - 4)
            f = _ellipsoid(P, st["centre"], st["semi"], st["rot"])
            inner = f < (1 - 5 / min(st["semi"])) ** 2
            self.paint(sl, below & (f < 1), _T.STOMACH_WALL)
            self.paint(sl, below & inner, _T.STOMACH_CONTENT)
            gas = P[1] > st["centre"][1] + st["gas_level"] * st["semi"][1]
            self.paint(sl, below & inner & gas, _T.BOWEL_GAS)
        # Muscles of the posterior abdominal wall.
        sl = self.box((-120, a.yv - 90, -400), (120, a.yv + 40, a.psoas_top))
        if sl is not None:
            px, py, pz = self.sub(sl)
            r = a.psoas_r * np.clip((a.psoas_top - pz) / 110, 0, 1) ** 0.6
            xc = a.vb_a + 4 + 0.5 * r
            psoas = (np.abs(px) - xc) ** 2 + (py - a.yv - 2) ** 2 < r**2
            ql = ((np.abs(px) - 55) / 15) ** 2 + ((py - a.yv + 22) / 10) ** 2 < 1
            self.paint(sl, (psoas | ql) & cavity[sl], _T.MUSCLE)
        for kind, p0, p1, r in a.renal:
            sl = self._capsule_box(p0, p1, r)
            if sl is not None:
                self.paint(sl, _capsule(self.sub(sl), p0, p1, r) & cavity[sl], kind)
        self._liver(cavity)
        for p0, p1, r in a.pancreas:
            sl = self._capsule_box(p0, p1, r)
            if sl is not None:
                self.paint(sl, _capsule(self.sub(sl), p0, p1, r) & cavity[sl], _T.PANCREAS)
        sl = self._ellipsoid_box(a.gb["centre"], a.gb["semi"])
        if sl is not None:
            self.paint(sl, a.gallbladder(self.sub(sl)) & cavity[sl], _T.GALLBLADDER)
        sl = self._ellipsoid_box(a.spleen["centre"], a.spleen["semi"])
        if sl is not None:
            P = self.sub(sl)
            spleen = a.spleen_shape(P) & cavity[sl] & (P[2] < a.diaphragm(P) - 4)
            self.paint(sl, spleen, _T.SPLEEN)
        for k in a.kidneys:
            self._kidney(k, cavity)
        sl = self.box((a.ivc_x - 20, a.ivc_y - 20, -400), (a.ivc_x + 20, a.ivc_y + 20, a.hr))
        if sl is not None:
            self.paint(sl, a.ivc(self.sub(sl)), _T.IVC)
        sl = self.box((a.ao_x - 40, a.ao_y - 40, -400), (a.ao_x + 40, a.ao_y + 40, 400))
        if sl is not None:
            self.paint(sl, a.aorta(self.sub(sl)), _T.AORTA)

    def _liver(self, cavity) -> None:
        a = self.anat
        c, s = a.liver_r["centre"], a.liver_r["semi"]
        sl = self.box(
            (-0.5 * a.cx - 80, -a.cyp - 10, c[2] - s[2] - 10), (a.cx + 10, a.cya + 10, a.hr + 10)
        )
        if sl is None:
            return
        P = self.sub(sl)
        liver = a.liver(P) & cavity[sl]
        self.paint(sl, liver, _T.LIVER)
        vessels = (np.abs(self.fa[sl]) < 0.16) & (np.abs(self.fb[sl]) < 0.16)
        for p0, p1, r in a.liver_veins:
            vessels |= _capsule(P, p0, p1, r)
        self.paint(sl, liver & vessels, _T.LIVER_VESSEL)
        # The extrahepatic portal vein.
        p0, p1, r = a.liver_veins[0]
        self.paint(sl, ~liver & cavity[sl] & _capsule(P, p0, p1, r), _T.VEIN)

    def _kidney(self, k: dict, cavity) -> None:
        sl = self._ellipsoid_box(k["centre"], k["semi"])
        if sl is None:
            return
        P = self.sub(sl)
        u = self.anat.kidney_local(P, k)
        a, b, c = k["semi"]
        f = (u[0] / a) ** 2 + (u[1] / b) ** 2 + (u[2] / c) ** 2
        sinus = ((u[0] - 0.45 * a) / (0.6 * a)) ** 2 + (u[1] / (0.5 * b)) ** 2 + (
            u[2] / (0.6 * c)
        ) ** 2 < 1
        parenchyma = (f < 1) & ~sinus & cavity[sl]
        left = k["side"] < 0
        cortex = _T.KIDNEY_LEFT_CORTEX if left else _T.KIDNEY_RIGHT_CORTEX
        medulla = _T.KIDNEY_LEFT_MEDULLA if left else _T.KIDNEY_RIGHT_MEDULLA
        self.paint(sl, parenchyma, cortex)
        pyramids = np.cos(7 * np.arctan2(u[2] / c, u[1] / b)) > -0.3
        self.paint(sl, parenchyma & (f < 0.6) & pyramids, medulla)
        self.paint(sl, sinus & (f < 1) & cavity[sl], _T.VISCERAL_FAT)
        # Renal pelvis (urine; bright when contrast is excreted) in the sinus, open to the hilum.
        pelvis = ((u[0] - 0.62 * a) / (0.4 * a)) ** 2 + (u[1] / (0.28 * b)) ** 2 + (
            u[2] / (0.3 * c)
        ) ** 2 < 1
        self.paint(sl, pelvis & (f < 1.15) & cavity[sl], _T.RENAL_PELVIS)

    def _spine(self, depth, muscle) -> None:
        a = self.anat
        sl = self.box((-90, a.yv - 110, -400), (90, a.yv + 30, 400))
        if sl is None:
            return
        P = self.sub(sl)
        px, py, pz = P
        inside = depth[sl] < muscle[sl]
        # Paraspinal muscles.
        para = ((np.abs(px) - 24) / 22) ** 2 + ((py - a.yv + 45) / 24) ** 2 < 1
        self.paint(sl, para & inside, _T.MUSCLE)
        phase = _frac((pz - a.level0) / a.level)
        body = a.vertebral_body(P)
        shell = (1 - 2.5 / a.vb_b) ** 2
        cy = a.yv - a.vb_b - 9  # spinal canal centre
        canal = (px / 10) ** 2 + ((py - cy) / 8.5) ** 2 < 1
        arch = ((px / 16) ** 2 + ((py - cy) / 14) ** 2 < 1) & (py < a.yv - a.vb_b + 3)
        spinous = (np.abs(px) < 3.5 + 0.03 * (cy - py)) & (py < cy) & (py > cy - 52)
        spinous &= (phase > 0.2) & (phase < 0.85)
        transverse = (np.abs(px) > 12) & (np.abs(px) < 36) & (np.abs(py - cy - 3) < 4)
        transverse &= (phase > 0.4) & (phase < 0.6)
        self.paint(sl, (arch | spinous | transverse) & inside & ~canal, _T.VERTEBRA_POSTERIOR)
        self.paint(sl, canal, _T.SPINAL_CANAL)
        endplate = (phase < 9 / a.level) | (phase > 1 - 2 / a.level)
        self.paint(sl, body < 1, _T.VERTEBRA_CORTICAL)
        self.paint(sl, (body < shell) & ~endplate, _T.VERTEBRA_CANCELLOUS)
        self.paint(sl, (body < 1) & (phase < 7 / a.level), _T.DISC)

    def _lesions(self) -> list[tuple]:
        masks = []
        for les in self.anat.lesions:
            sl = self._ellipsoid_box(les["centre"], les["semi"])
            if sl is None:
                continue
            mask = _ellipsoid(self.sub(sl), les["centre"], les["semi"]) < 1
            mask &= np.isin(self.tissue[sl], (_T.LIVER, _T.LIVER_VESSEL))
            if mask.any():
                self.paint(sl, mask, _T.LIVER_LESION)
                masks.append((sl, mask, les["delta"]))
        return masks
