"""Draw the README figure of the phantom: ``docs/phantom.png``.

One CT case at the ``cpu`` profile's shape (48 x 128 x 128): four axial slices from the lung bases
to the lower abdomen and one coronal slice, without (top row) and with (bottom row) the label
overlay. Slices are shown in the package's one display convention (``medssl_kit.viz.viewer``: the
radiological one, anterior up and the patient's right on the left of the picture; superior up in
the coronal slice). Run from the repository root::

    python scripts/make_readme_figure.py [--case 3] [--seed 0] [--out docs/phantom.png]
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from medssl_kit.config import PROFILES  # noqa: E402
from medssl_kit.data.phantom import LABELS, Tissue, generate_case  # noqa: E402
from medssl_kit.viz.viewer import display_orientation  # noqa: E402

COLOURS = {
    1: (0.85, 0.25, 0.2),
    2: (0.25, 0.45, 0.95),
    3: (0.2, 0.8, 0.3),
    4: (0.95, 0.85, 0.2),
    5: (0.9, 0.2, 0.85),
    6: (0.2, 0.85, 0.9),
    7: (1.0, 0.55, 0.0),
}
WINDOW_HU = (-160, 240)  # abdominal window: level 40, width 400
MAX_BYTES = 300_000


def _pick_slices(label: np.ndarray) -> list[int]:
    """Four axial slices, top first: liver dome, a lesion (else the largest spleen), the largest
    kidney section and the lower abdomen below the kidneys."""
    area = {k: (label == k).sum(axis=(1, 2)) for k in LABELS if k}
    liver_z = np.flatnonzero(area[1])
    kidney_z = np.flatnonzero(area[3] + area[4])
    wanted = [
        int(liver_z[0] + 0.85 * (liver_z[-1] - liver_z[0])),
        int(np.argmax(area[7])) if area[7].any() else int(np.argmax(area[2])),
        int(np.argmax(area[3] + area[4])),
        max(0, int(kidney_z[0]) - 3),
    ]
    fallback = np.linspace(label.shape[0] - 4, 3, 8).astype(int).tolist()
    chosen: list[int] = []
    for k in wanted + fallback:
        if len(chosen) < 4 and all(abs(k - c) > 1 for c in chosen):
            chosen.append(k)
    return sorted(chosen, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw docs/phantom.png.")
    parser.add_argument("--case", type=int, default=3, help="case index (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/phantom.png"))
    args = parser.parse_args()

    case = generate_case(args.case, args.seed, shape=PROFILES["cpu"].phantom.shape)
    image, label = case.image, case.label
    sz, _, sx = case.spacing
    # Lesions (a few voxels) are drawn opaque so that they stay visible inside the liver overlay.
    cmap = ListedColormap(
        [(0, 0, 0, 0)] + [(*COLOURS[k], 1.0 if k == 7 else 0.45) for k in sorted(COLOURS)]
    )
    kidneys = np.argwhere((label == 3) | (label == 4))
    coronal_y = int(kidneys[:, 1].mean())
    slices = _pick_slices(label)
    # Crop to the body (plus a margin; not the couch), then turn every slice to the package's
    # display orientation (display_orientation: the radiological convention for RAS arrays).
    _, ys, xs = np.nonzero(~np.isin(case.tissue, (Tissue.AIR, Tissue.TABLE)))
    y0, y1 = max(ys.min() - 3, 0), ys.max() + 4
    x0, x1 = max(xs.min() - 3, 0), xs.max() + 4
    crop = (slice(y0, y1), slice(x0, x1))
    panels = [
        (display_orientation(image[k][crop]), display_orientation(label[k][crop]), 1.0)
        for k in slices
    ]
    coronal = (slice(None), coronal_y, crop[1])
    panels.append(
        (display_orientation(image[coronal]), display_orientation(label[coronal]), sz / sx)
    )
    depth = image.shape[0]
    titles = [f"axial, z = {(k + 0.5 - depth / 2) * sz:+.0f} mm" for k in slices] + ["coronal"]

    fig, axes = plt.subplots(2, len(panels), figsize=(2.7 * len(panels), 5.0))
    for col, ((img, lab, aspect), title) in enumerate(zip(panels, titles, strict=True)):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect)
            if row == 1:
                ax.imshow(lab, cmap=cmap, vmin=0, vmax=7, aspect=aspect, interpolation="nearest")
            ax.set_axis_off()
        axes[0, col].set_title(title, fontsize=9)
    handles = [Patch(color=COLOURS[k], label=LABELS[k].replace("_", " ")) for k in sorted(COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(
        f"medssl_kit phantom: CT case {case.case_id} (seed {args.seed},"
        f" {case.acquisition['phase'].replace('_', ' ')} phase), shape {image.shape},"
        f" spacing {sz:.2f} x {case.spacing[1]:.2f} x {sx:.2f} mm, window [-160, 240] HU",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.97), h_pad=0.3, w_pad=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72, pil_kwargs={"optimize": True})
    size = args.out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size} bytes, above the {MAX_BYTES}-byte budget")
    print(f"wrote {args.out} ({size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
