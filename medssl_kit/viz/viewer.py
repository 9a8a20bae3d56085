"""Slice viewer for volumes with label, prediction, uncertainty and CAM overlays (DESIGN §7.1).

Rendering is the pure function :func:`render_slice`, which turns one slice of a volume and its
overlays into a ``uint8`` RGB array; :class:`SliceViewer` is a thin ipywidgets front end that calls
it for the one slice on screen whenever a control changes (the volume is never pre-rendered).

Conventions
-----------
* Volumes are ``(D, H, W) = (z, y, x)`` numpy arrays or torch tensors; a leading channel axis of
  size 1 is dropped. Overlays must have the image's shape.
* Planes: ``axial`` indexes axis 0 (rows y, columns x), ``coronal`` axis 1 (rows z, columns x),
  ``sagittal`` axis 2 (rows z, columns y).
* Display orientation — one convention for every slice the package draws (viewer, uncertainty and
  CAM overlays, notebook figures, the README figure): the radiological one, for volumes in RAS
  order as :mod:`medssl_kit.data.io` loads them (x grows towards the patient's right, y towards
  anterior, z towards superior). Both in-plane axes are reversed (:func:`display_orientation`):
  an axial slice shows anterior at the top and the patient's right on the image's left (the
  vertebra at the bottom, the liver on the left); a coronal slice superior at the top and the
  patient's right on the left; a sagittal slice superior at the top and anterior on the left.
  Figures drawn with ``imshow`` use :func:`render_slice`, or :func:`display_orientation` /
  :func:`display_axial` for a bare slice or patch.
* Aspect: with ``spacing = (z, y, x)`` in mm, the slice's rows and columns are repeated by
  nearest-neighbour resampling so that every output pixel is square, at the resolution of the
  slice's finer axis (a 48-slice volume with 2.5 mm slices and 0.8 mm pixels renders coronal
  slices 150 rows tall). Without spacing voxels are taken as isotropic.
* Layers, bottom to top: the windowed grey image; the uncertainty and CAM heat maps; the label
  as a filled colour overlay; the prediction as class contours (``prediction_style="contour"``, so
  it can sit on the label) or fills. Label id 0 (background) and 255 (ignore) are not drawn.
* Heat maps are normalised to [0, 1] over the whole volume (min to max), coloured with matplotlib's
  ``inferno`` (uncertainty) or ``jet`` (CAM), and blended with a per-pixel alpha of
  ``opacity * value``: a zero-valued pixel leaves the image untouched and the change grows with the
  value.
"""

from __future__ import annotations

import colorsys
import html
import io
import math
import operator
from collections.abc import Mapping
from typing import Any

import ipywidgets as widgets
import matplotlib
import numpy as np
import PIL.Image
from matplotlib.colors import to_hex, to_rgb

from medssl_kit.data.phantom import LABELS

IGNORE_INDEX = 255
PLANES: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
HEAT_COLORMAPS: dict[str, str] = {"uncertainty": "inferno", "cam": "jet"}
DEFAULT_OPACITY: dict[str, float] = {
    "label": 0.4,
    "prediction": 0.8,
    "uncertainty": 0.5,
    "cam": 0.5,
}

DEFAULT_CLASS_NAMES: dict[int, str] = LABELS  # the phantom's classes
DEFAULT_COLORS: dict[int, str] = {
    1: "#e6862a",  # liver: orange
    2: "#8e5cd9",  # spleen: violet
    3: "#2fa8e8",  # kidney_left: sky blue
    4: "#2ec27e",  # kidney_right: green
    5: "#e0302f",  # aorta: red
    6: "#f2e394",  # vertebra: bone
    7: "#ff3fd2",  # liver_lesion: magenta
}

CONTROL_LABEL_WIDTH = "110px"  # the controls' descriptions; fits "uncertainty α"
CONTROL_MAX_WIDTH = "520px"  # sliders fill the panel up to this width (narrower side by side)

Colors = Mapping[int, Any]  # class id -> any matplotlib colour spec ("red", "#ff0000", (1, 0, 0))


def class_color(class_id: int, colors: Colors | None = None) -> np.ndarray:
    """RGB in [0, 1] for a class: ``colors`` first, then the default table, then a generated hue.

    Generated colours step the hue by the golden ratio, so neighbouring ids differ clearly and the
    same id always gets the same colour.
    """
    class_id = int(class_id)
    if colors and class_id in colors:
        return np.array(to_rgb(colors[class_id]))
    if class_id in DEFAULT_COLORS:
        return np.array(to_rgb(DEFAULT_COLORS[class_id]))
    return np.array(colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.75, 0.95))


def default_window(image: Any) -> tuple[float, float]:
    """The display window used when none is given: the 1st and 99th percentiles of the volume."""
    vol = _as_volume(image, "image")
    lo, hi = (float(v) for v in np.percentile(vol, [1, 99]))
    if hi <= lo:  # (nearly) constant volume: fall back to the full range
        lo, hi = float(vol.min()), float(vol.max())
    return lo, hi


def display_orientation(slice_: Any) -> np.ndarray:
    """A slice in array order ``(..., rows, cols)`` turned to the display convention (module
    docstring): both in-plane axes reversed, so an axial slice of a RAS volume shows anterior at
    the top and the patient's right on the left. Use it for every slice drawn outside
    :func:`render_slice` (``plt.imshow(display_orientation(volume[z]))``); torch tensors accepted.
    """
    if hasattr(slice_, "detach"):  # torch tensor, without importing torch here
        slice_ = slice_.detach().cpu().numpy()
    array = np.asarray(slice_)
    if array.ndim < 2:
        raise ValueError(f"a slice needs two in-plane axes, got shape {array.shape}")
    return array[..., ::-1, ::-1]


def display_axial(image: Any, index: int | None = None) -> np.ndarray:
    """An axial slice of ``image``'s first channel in the display orientation, for ``imshow``.

    ``image`` is ``[C, H, W]`` (a 2D slice, view or patch) or ``[C, D, H, W]`` (a 3D patch;
    ``index`` picks the axial slice, default the middle one); numpy or torch.
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 4:
        array = array[:, array.shape[1] // 2 if index is None else index]
    elif array.ndim != 3 or index is not None:
        raise ValueError(
            f"image must be [C, H, W] (no index) or [C, D, H, W], got shape {array.shape}"
        )
    return display_orientation(array[0])


def render_slice(
    image: Any,
    index: int,
    plane: str = "axial",
    *,
    label: Any = None,
    prediction: Any = None,
    uncertainty: Any = None,
    cam: Any = None,
    window: tuple[float, float] | None = None,
    label_opacity: float = 0.4,
    prediction_opacity: float = 0.8,
    uncertainty_opacity: float = 0.5,
    cam_opacity: float = 0.5,
    prediction_style: str = "contour",
    colors: Colors | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Render one slice of ``image`` with its overlays as a ``uint8`` RGB array ``(h, w, 3)``.

    Args:
        image: the volume, ``(D, H, W)`` or ``(1, D, H, W)``, numpy or torch.
        index: slice index along the plane's axis.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        label, prediction: integer class maps (0 background, 255 ignore), same shape as the image.
        uncertainty, cam: real-valued maps, normalised to [0, 1] over the volume.
        window: ``(lo, hi)`` in image units mapped to black and white; ``None`` takes the 1st–99th
            percentile of the volume.
        label_opacity, prediction_opacity, uncertainty_opacity, cam_opacity: blend weights in
            [0, 1] (a heat map's weight is further scaled by its normalised value).
        prediction_style: ``"contour"`` (class boundaries) or ``"fill"``.
        colors: class id → matplotlib colour, overriding the default table.
        spacing: voxel size ``(z, y, x)`` in mm, for the displayed aspect ratio.

    Raises:
        ValueError: an overlay's shape differs from the image's (the message names the overlay),
            an unknown plane or prediction style, an index out of range, or a bad window/spacing.
    """
    vol, layers, ranges = _prepare(image, label, prediction, uncertainty, cam)
    opacity = {
        "label": label_opacity,
        "prediction": prediction_opacity,
        "uncertainty": uncertainty_opacity,
        "cam": cam_opacity,
    }
    return _compose(
        vol,
        index,
        plane,
        window=default_window(vol) if window is None else window,
        layers=layers,
        ranges=ranges,
        opacity=opacity,
        prediction_style=prediction_style,
        colors=colors,
        spacing=spacing,
    )


class SliceViewer:
    """Interactive slice viewer (ipywidgets) over :func:`render_slice`.

    ``labels`` maps class ids (ints or strings, as in a manifest) to names for the legend;
    ``colors`` and ``prediction_style`` are passed to :func:`render_slice`.

    Controls: ``slider`` (slice index), ``plane`` (axial / coronal / sagittal toggle; switching
    plane re-centres the slider on the new plane's middle slice), ``window`` (a range slider: the
    grey window in image units, read out in ``window_readout``), ``opacity[name]`` (one slider per
    overlay given) and ``legend`` (the classes present in label and prediction). The rendered
    slice is the PNG in ``image_widget``; ``widget`` is the whole panel. Displaying the viewer in
    a notebook displays ``widget``; :meth:`show` sets the state programmatically and returns the
    RGB array.
    """

    def __init__(
        self,
        image: Any,
        label: Any = None,
        prediction: Any = None,
        uncertainty: Any = None,
        cam: Any = None,
        *,
        labels: Mapping[Any, str] | None = None,
        spacing: tuple[float, float, float] | None = None,
        window: tuple[float, float] | None = None,
        title: str | None = None,
        colors: Colors | None = None,
        prediction_style: str = "contour",
    ) -> None:
        self._vol, self._layers, self._ranges = _prepare(image, label, prediction, uncertainty, cam)
        self._spacing = spacing
        self._colors = colors
        self._prediction_style = prediction_style
        self._quiet = False
        self._rgb: np.ndarray  # the slice on screen, set by every render

        lo, hi = default_window(self._vol) if window is None else window
        vmin, vmax = min(float(self._vol.min()), lo), max(float(self._vol.max()), hi)
        vmax = vmax if vmax > vmin else vmin + 1.0
        self.image_widget = widgets.Image(format="png", width="512")
        # Room for the longest description ("uncertainty α") so that no label is cut short.
        style = {"description_width": CONTROL_LABEL_WIDTH}
        layout = widgets.Layout(width="100%", max_width=CONTROL_MAX_WIDTH)
        self.plane = widgets.ToggleButtons(
            options=list(PLANES),
            value="axial",
            description="plane",
            style={**style, "button_width": "90px"},
            layout=widgets.Layout(display="flex", align_items="center"),  # label beside buttons
        )
        self.slider = widgets.IntSlider(
            min=0,
            max=self._vol.shape[0] - 1,
            value=self._vol.shape[0] // 2,
            description="slice",
            style=style,
            layout=layout,
        )
        step = (vmax - vmin) / 1000
        self.window = widgets.FloatRangeSlider(
            min=vmin,
            max=vmax,
            value=(lo, hi),
            step=step,
            readout=False,  # the slider's own readout box is too narrow for "lo – hi"
            description="window",
            style=style,
            layout=widgets.Layout(flex="1 1 auto", width="auto"),
        )
        self.window_readout = widgets.Label(
            window_text(lo, hi, step), layout=widgets.Layout(flex="0 0 auto")
        )
        self.opacity = {
            name: widgets.FloatSlider(
                value=DEFAULT_OPACITY[name],
                min=0.0,
                max=1.0,
                step=0.05,
                description=f"{name} α",
                style=style,
                layout=layout,
            )
            for name in self._layers
        }
        self.legend = widgets.HTML(legend_html(self._classes_present(), labels, colors))
        header = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.widget = widgets.VBox(
            [
                *header,
                self.image_widget,
                self.plane,
                self.slider,
                widgets.HBox(
                    [self.window, self.window_readout],
                    layout=widgets.Layout(width="100%", max_width=CONTROL_MAX_WIDTH),
                ),
                *self.opacity.values(),
                self.legend,
            ]
        )

        self.plane.observe(self._on_plane, "value")
        for control in (self.slider, self.window, *self.opacity.values()):
            control.observe(self._update, "value")
        self._update()

    def show(self, index: int | None = None, plane: str | None = None) -> np.ndarray:
        """Set the plane and/or slice index and return the rendered RGB array ``(h, w, 3)``."""
        if plane is not None:
            if plane not in PLANES:
                raise ValueError(f"plane must be one of {list(PLANES)}, got {plane!r}")
            self.plane.value = plane
        if index is not None:
            n = self._vol.shape[PLANES[self.plane.value]]
            if not 0 <= index < n:
                raise ValueError(
                    f"index {index} out of range [0, {n}) for the {self.plane.value} plane"
                )
            self.slider.value = index
        return self._rgb

    def _repr_mimebundle_(self, **kwargs: Any) -> dict | None:
        """Display the widget panel in Jupyter."""
        return self.widget._repr_mimebundle_(**kwargs)

    def _classes_present(self) -> list[int]:
        ids: set[int] = set()
        for name in ("label", "prediction"):
            if name in self._layers:
                ids.update(int(i) for i in np.unique(self._layers[name]))
        return sorted(ids - {0, IGNORE_INDEX})

    def _on_plane(self, change: Any) -> None:
        """Re-centre the slider on the new plane (its middle slice), then render once."""
        depth = self._vol.shape[PLANES[change["new"]]]
        self._quiet = True
        try:
            self.slider.max = depth - 1
            self.slider.value = depth // 2
        finally:
            self._quiet = False
        self._update()

    def _update(self, change: Any = None) -> None:
        """Render the current slice and put it on screen as PNG."""
        if self._quiet:
            return
        self.window_readout.value = window_text(*self.window.value, self.window.step)
        self._rgb = _compose(
            self._vol,
            self.slider.value,
            self.plane.value,
            window=self.window.value,
            layers=self._layers,
            ranges=self._ranges,
            opacity={name: s.value for name, s in self.opacity.items()},
            prediction_style=self._prediction_style,
            colors=self._colors,
            spacing=self._spacing,
        )
        buffer = io.BytesIO()
        PIL.Image.fromarray(self._rgb).save(buffer, format="PNG")
        self.image_widget.value = buffer.getvalue()


def window_text(lo: float, hi: float, step: float) -> str:
    """The window readout ``"lo – hi"`` with as many decimals as the slider's step resolves
    (step 0.001 on [0, 1] images: ``"0.125 – 0.875"``; step 4 HU: ``"-160 – 240"``)."""
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 3
    return f"{lo:.{decimals}f} – {hi:.{decimals}f}"


def legend_html(
    class_ids: list[int], labels: Mapping[Any, str] | None = None, colors: Colors | None = None
) -> str:
    """HTML legend: a colour swatch and name per class (names from ``labels``, then the defaults).

    ``labels`` keys may be ints or strings (as in a manifest's ``"labels"``).
    """
    names = {int(k): v for k, v in (labels or {}).items()}
    items = []
    for class_id in class_ids:
        name = names.get(class_id, DEFAULT_CLASS_NAMES.get(class_id, f"class {class_id}"))
        swatch = (
            "display:inline-block;width:12px;height:12px;border:1px solid #444;"
            f"vertical-align:middle;background:{to_hex(class_color(class_id, colors))}"
        )
        items.append(
            f'<span style="margin-right:12px;white-space:nowrap"><span style="{swatch}"></span> '
            f"{class_id} {html.escape(name)}</span>"
        )
    return "<div>" + ("".join(items) or "<i>no classes</i>") + "</div>"


def _as_volume(x: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` as a ``(D, H, W)`` numpy array (torch tensors and a leading 1-channel accepted)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    vol = np.asarray(x)
    if vol.ndim == 4 and vol.shape[0] == 1:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"{name} must be a (D, H, W) volume, got shape {tuple(np.shape(x))}")
    if shape is not None and vol.shape != shape:
        raise ValueError(f"{name} has shape {vol.shape}, but the image has shape {shape}")
    return vol


def _prepare(
    image: Any, label: Any, prediction: Any, uncertainty: Any, cam: Any
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """Validate the inputs: the image, the overlays given by name, and the heat maps' (min, max)."""
    vol = _as_volume(image, "image")
    given = {"label": label, "prediction": prediction, "uncertainty": uncertainty, "cam": cam}
    layers = {name: _as_volume(v, name, vol.shape) for name, v in given.items() if v is not None}
    ranges = {
        name: (float(np.nanmin(v)), float(np.nanmax(v)))
        for name, v in layers.items()
        if name in HEAT_COLORMAPS
    }
    return vol, layers, ranges


def _compose(
    vol: np.ndarray,
    index: int,
    plane: str,
    *,
    window: tuple[float, float],
    layers: Mapping[str, np.ndarray],
    ranges: Mapping[str, tuple[float, float]],
    opacity: Mapping[str, float],
    prediction_style: str,
    colors: Colors | None,
    spacing: tuple[float, float, float] | None,
) -> np.ndarray:
    """Render validated volumes; ``ranges`` are the heat maps' volume-wide (min, max)."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {list(PLANES)}, got {plane!r}")
    if prediction_style not in ("contour", "fill"):
        raise ValueError(f"prediction_style must be 'contour' or 'fill', got {prediction_style!r}")
    lo, hi = window
    if hi < lo:
        raise ValueError(f"window must be (lo, hi) with lo <= hi, got {window}")
    axis, index = PLANES[plane], operator.index(index)
    if not 0 <= index < vol.shape[axis]:
        raise ValueError(f"index {index} out of range [0, {vol.shape[axis]}) for the {plane} plane")
    rows, cols = _resample_indices(vol.shape, axis, spacing)

    def take(v: np.ndarray) -> np.ndarray:
        return display_orientation(np.take(v, index, axis=axis))[np.ix_(rows, cols)]

    grey = np.clip((take(vol).astype(np.float32) - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for name, cmap in HEAT_COLORMAPS.items():
        if name in layers:
            vmin, vmax = ranges[name]
            value = np.nan_to_num(take(layers[name]).astype(np.float32) - vmin)
            if vmax > vmin:
                value = np.clip(value / (vmax - vmin), 0.0, 1.0)
            alpha = (opacity[name] * value)[..., None]
            rgb = (1.0 - alpha) * rgb + alpha * matplotlib.colormaps[cmap](value)[..., :3]
    if "label" in layers:
        _blend_classes(rgb, take(layers["label"]), opacity["label"], colors, contour=False)
    if "prediction" in layers:
        contour = prediction_style == "contour"
        _blend_classes(rgb, take(layers["prediction"]), opacity["prediction"], colors, contour)
    return np.round(rgb * 255.0).astype(np.uint8)


def _resample_indices(
    shape: tuple[int, ...], axis: int, spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour row/column indices that make the slice's pixels square (the displayed
    slice's rows and columns: the in-plane axes are reversed, their sizes unchanged)."""
    in_plane = [a for a in range(3) if a != axis]
    sizes = [shape[a] for a in in_plane]
    if spacing is None:
        return np.arange(sizes[0]), np.arange(sizes[1])
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes (z, y, x) in mm, got {spacing}")
    steps = [float(spacing[a]) for a in in_plane]
    finest = min(steps)
    out = []
    for n, step in zip(sizes, steps, strict=True):
        m = max(1, round(n * step / finest))
        out.append(np.minimum((np.arange(m) + 0.5) * n / m, n - 1).astype(np.intp))
    return out[0], out[1]


def _blend_classes(
    rgb: np.ndarray, classes: np.ndarray, alpha: float, colors: Colors | None, contour: bool
) -> None:
    """Alpha-blend class colours into ``rgb`` in place (fills, or only the class boundaries)."""
    classes = classes.astype(np.int64)
    mask = (classes != 0) & (classes != IGNORE_INDEX)
    if contour:
        padded = np.pad(classes, 1, mode="edge")
        centre = padded[1:-1, 1:-1]
        mask &= (
            (centre != padded[:-2, 1:-1])
            | (centre != padded[2:, 1:-1])
            | (centre != padded[1:-1, :-2])
            | (centre != padded[1:-1, 2:])
        )
    if alpha <= 0 or not mask.any():
        return
    ids, inverse = np.unique(classes[mask], return_inverse=True)
    palette = np.stack([class_color(i, colors) for i in ids])
    rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * palette[inverse.ravel()]
