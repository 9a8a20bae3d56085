"""Tests of the slice viewer: the pure renderer and the widget driven headless (no browser)."""

from __future__ import annotations

import io
import re

import ipywidgets as widgets
import matplotlib
import numpy as np
import PIL.Image
import pytest
import torch

from medssl_kit.data.datasets import load_volumes
from medssl_kit.data.manifest import load_manifest
from medssl_kit.viz import viewer
from medssl_kit.viz.viewer import (
    SliceViewer,
    class_color,
    default_window,
    display_orientation,
    render_slice,
)

D, H, W = 8, 24, 32
WINDOW = (0.0, 200.0)


@pytest.fixture()
def volume() -> dict[str, np.ndarray]:
    """A small volume: a body of value 100 with a "liver" (1), a "kidney" (3) and a bright bone."""
    image = np.zeros((D, H, W), np.float32)
    image[:, 2:22, 2:30] = 100.0
    image[:, 18:22, 14:18] = 200.0
    label = np.zeros((D, H, W), np.uint8)
    label[2:6, 4:12, 4:14] = 1
    label[3:5, 14:20, 20:28] = 3
    prediction = np.zeros_like(label)
    prediction[2:6, 5:13, 5:15] = 1
    x = np.linspace(0.0, 1.0, W, dtype=np.float32)
    uncertainty = np.broadcast_to(x, (D, H, W)).copy()
    cam = np.broadcast_to(x[::-1], (D, H, W)).copy()
    return {
        "image": image,
        "label": label,
        "prediction": prediction,
        "uncertainty": uncertainty,
        "cam": cam,
    }


def decode(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))


def array_order(rgb: np.ndarray) -> np.ndarray:
    """A rendered slice back in array order (the display reverses both in-plane axes), so that
    pixel checks can use the volume's (y, x) indices."""
    return rgb[::-1, ::-1]


# --- render_slice -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plane", "shape"), [("axial", (H, W)), ("coronal", (D, W)), ("sagittal", (D, H))]
)
def test_render_shape_and_dtype_per_plane(volume, plane, shape):
    rgb = render_slice(volume["image"], 3, plane, label=volume["label"], window=WINDOW)
    assert rgb.dtype == np.uint8
    assert rgb.shape == (*shape, 3)


def test_anisotropic_spacing_gives_square_pixels(volume):
    spacing = (3.0, 1.0, 1.0)  # thick slices
    assert render_slice(volume["image"], 4, "axial", spacing=spacing).shape == (H, W, 3)
    assert render_slice(volume["image"], 4, "coronal", spacing=spacing).shape == (3 * D, W, 3)
    assert render_slice(volume["image"], 4, "sagittal", spacing=spacing).shape == (3 * D, H, 3)
    # coarse in-plane x: columns are repeated instead
    assert render_slice(volume["image"], 4, "axial", spacing=(1.0, 1.0, 2.0)).shape == (H, 2 * W, 3)


def ramp(axis: int, n: int) -> np.ndarray:
    """A (D, H, W) volume whose value is the index along ``axis`` (0 .. n-1)."""
    shape = [1, 1, 1]
    shape[axis] = n
    return np.broadcast_to(np.arange(n, dtype=np.float32).reshape(shape), (D, H, W))


@pytest.mark.parametrize(
    ("plane", "top", "left"),
    [
        ("axial", "y", "x"),  # anterior (high y) up, the patient's right (high x) on the left
        ("coronal", "z", "x"),  # superior (high z) up, the patient's right on the left
        ("sagittal", "z", "y"),  # superior up, anterior (high y) on the left
    ],
)
def test_display_orientation_is_radiological_for_ras_volumes(plane, top, left):
    axes, sizes = {"z": 0, "y": 1, "x": 2}, {"z": D, "y": H, "x": W}
    rows = render_slice(ramp(axes[top], sizes[top]), 1, plane, window=(0, sizes[top] - 1))
    assert rows[0, 0, 0] == 255 and rows[-1, 0, 0] == 0  # the highest index at the top
    cols = render_slice(ramp(axes[left], sizes[left]), 1, plane, window=(0, sizes[left] - 1))
    assert cols[0, 0, 0] == 255 and cols[0, -1, 0] == 0  # the highest index on the left


def test_display_orientation_helper_matches_render_slice(volume):
    image = volume["image"]
    grey = np.clip(display_orientation(image[3]) / 200.0, 0, 1)
    np.testing.assert_array_equal(
        render_slice(image, 3, window=WINDOW)[..., 0], np.round(grey * 255).astype(np.uint8)
    )
    tensor = display_orientation(torch.from_numpy(image)[None, 3])  # leading axes are kept
    np.testing.assert_array_equal(tensor[0], display_orientation(image[3]))
    with pytest.raises(ValueError, match="two in-plane axes"):
        display_orientation(image[3, 0])


def test_phantom_axial_slice_has_the_vertebra_low_and_the_liver_left(tiny_phantom):
    """A phantom case read as a user reads it (NIfTI -> RAS): the radiological display puts the
    vertebra (6) in the lower half and the liver (1, the patient's right) in the left half, in
    render_slice and in the viewer."""
    vol = load_volumes(load_manifest(tiny_phantom), "test")[0]
    label = vol.label[0].numpy()
    z = int(np.argmax((label == 1).sum((1, 2)) * (label == 6).sum((1, 2))))
    rgb = render_slice(vol.image[0], z, label=label, label_opacity=1.0)
    shown = SliceViewer(vol.image[0], label, spacing=vol.spacing).show(index=z)
    assert vol.spacing[1] == vol.spacing[2]  # square pixels: the halves are the volume's
    for class_id, want in (6, "bottom"), (1, "left"):
        colour = np.round(255 * class_color(class_id))
        rows, cols = np.nonzero((rgb == colour).all(axis=2))
        assert rows.size, f"class {class_id} is drawn"
        half = rows.mean() / rgb.shape[0] if want == "bottom" else cols.mean() / rgb.shape[1]
        assert half > 0.5 if want == "bottom" else half < 0.5, (class_id, want, half)
    # the viewer draws what render_slice draws
    np.testing.assert_array_equal(
        shown, render_slice(vol.image[0], z, label=label, spacing=vol.spacing)
    )


def test_label_overlay_tints_labelled_pixels_only(volume):
    rgb = array_order(
        render_slice(volume["image"], 3, label=volume["label"], window=WINDOW, label_opacity=0.4)
    )
    grey = 0.5  # value 100 in window (0, 200)
    expected = np.round(255 * (0.6 * grey + 0.4 * class_color(1)))
    np.testing.assert_allclose(rgb[8, 8], expected, atol=1)  # inside the liver box
    assert rgb[18, 24].tolist() != rgb[20, 5].tolist()  # kidney (3) is tinted too
    assert rgb[20, 5].tolist() == [128, 128, 128]  # background body pixel is plain grey


def test_zero_opacity_gives_plain_image(volume):
    plain = render_slice(volume["image"], 3, window=WINDOW)
    assert len(np.unique(plain.reshape(-1, 3), axis=0)) == 3  # black, grey and white only
    faded = render_slice(
        volume["image"],
        3,
        **{k: v for k, v in volume.items() if k != "image"},
        window=WINDOW,
        label_opacity=0,
        prediction_opacity=0,
        uncertainty_opacity=0,
        cam_opacity=0,
    )
    np.testing.assert_array_equal(faded, plain)


def test_window_maps_image_units(volume):
    assert render_slice(volume["image"], 3, window=(0, 200))[10, 16].tolist() == [128] * 3
    assert render_slice(volume["image"], 3, window=(0, 400))[10, 16].tolist() == [64] * 3
    assert render_slice(volume["image"], 3, window=(-100, 100))[10, 16].tolist() == [255] * 3


def test_default_window_is_percentile_range():
    image = np.random.default_rng(0).normal(0, 50, (D, H, W)).astype(np.float32)
    lo, hi = np.percentile(image, [1, 99])
    assert default_window(image) == pytest.approx((lo, hi))
    np.testing.assert_array_equal(render_slice(image, 2), render_slice(image, 2, window=(lo, hi)))


@pytest.mark.parametrize(("name", "cmap"), [("uncertainty", "inferno"), ("cam", "jet")])
def test_heat_overlay_blends_in_proportion_to_value(name, cmap):
    image = np.full((D, H, W), 100.0, np.float32)
    value = np.broadcast_to(np.linspace(0, 1, W, dtype=np.float32), (D, H, W))
    heat = 5.0 + 10.0 * value  # normalised to [0, 1] over the volume by the renderer
    plain = array_order(render_slice(image, 0, window=WINDOW)).astype(float)
    rgb = array_order(render_slice(image, 0, window=WINDOW, **{name: heat, f"{name}_opacity": 0.5}))
    colour = matplotlib.colormaps[cmap](value[0])[..., :3]
    alpha = 0.5 * value[0][..., None]
    expected = (1 - alpha) * plain / 255 + alpha * colour
    np.testing.assert_allclose(rgb, np.round(255 * expected), atol=1)
    change = np.abs(rgb.astype(float) - plain).sum(axis=2)[0]
    assert change[0] == 0  # zero value leaves the image untouched
    assert change[W // 4] < change[W // 2] < change[-1]


def test_ignore_index_is_not_drawn(volume):
    label = volume["label"].copy()
    label[:, 14:22, 2:12] = 255
    plain = array_order(render_slice(volume["image"], 3, window=WINDOW))
    rgb = array_order(
        render_slice(volume["image"], 3, label=label, prediction=label, window=WINDOW)
    )
    np.testing.assert_array_equal(rgb[14:22, 2:12], plain[14:22, 2:12])


def test_prediction_contour_and_fill(volume):
    kwargs = {"prediction": volume["prediction"], "window": WINDOW, "prediction_opacity": 1.0}
    contour = array_order(render_slice(volume["image"], 3, **kwargs))
    fill = array_order(render_slice(volume["image"], 3, prediction_style="fill", **kwargs))
    liver = np.round(255 * class_color(1)).tolist()
    assert contour[5, 8].tolist() == liver  # boundary row of the predicted box
    assert contour[9, 9].tolist() == [128] * 3  # interior untouched by the contour
    assert fill[9, 9].tolist() == liver


def test_unknown_class_and_custom_colours(volume):
    label = volume["label"].copy()
    label[label == 3] = 12  # an id outside the default table
    rgb = array_order(
        render_slice(volume["image"], 3, label=label, window=WINDOW, label_opacity=1.0)
    )
    generated = rgb[16, 24]
    assert len(set(generated.tolist())) > 1  # coloured, not grey
    assert generated.tolist() == np.round(255 * class_color(12)).tolist()
    custom = array_order(
        render_slice(
            volume["image"], 3, label=label, window=WINDOW, label_opacity=1.0, colors={1: "#00ff00"}
        )
    )
    assert custom[8, 8].tolist() == [0, 255, 0]


def test_torch_and_channel_first_inputs(volume):
    expected = render_slice(volume["image"], 3, label=volume["label"], window=WINDOW)
    rgb = render_slice(
        torch.from_numpy(volume["image"])[None],
        3,
        label=torch.from_numpy(volume["label"].astype(np.int64)),
        window=WINDOW,
    )
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize("name", ["label", "prediction", "uncertainty", "cam"])
def test_wrong_overlay_shape_raises_naming_it(volume, name):
    with pytest.raises(ValueError, match=name):
        render_slice(volume["image"], 0, **{name: volume[name][:, :-1]})
    with pytest.raises(ValueError, match=name):
        SliceViewer(volume["image"], **{name: volume[name][1:]})


def test_bad_arguments_raise(volume):
    with pytest.raises(ValueError, match="plane"):
        render_slice(volume["image"], 0, "oblique")
    with pytest.raises(ValueError, match="out of range"):
        render_slice(volume["image"], D, "axial")
    with pytest.raises(ValueError, match="prediction_style"):
        render_slice(volume["image"], 0, prediction_style="dotted")
    with pytest.raises(ValueError, match="volume"):
        render_slice(volume["image"][0], 0)


# --- SliceViewer, driven headless --------------------------------------------------------------


@pytest.fixture()
def sv(volume) -> SliceViewer:
    return SliceViewer(
        volume["image"],
        volume["label"],
        volume["prediction"],
        volume["uncertainty"],
        labels={1: "liver", 3: "kidney_left"},
        spacing=(2.0, 1.0, 1.0),
        title="case_000",
    )


def expected_slice(sv: SliceViewer, volume) -> np.ndarray:
    """render_slice for the viewer's current state."""
    return render_slice(
        volume["image"],
        sv.slider.value,
        sv.plane.value,
        label=volume["label"],
        prediction=volume["prediction"],
        uncertainty=volume["uncertainty"],
        window=sv.window.value,
        label_opacity=sv.opacity["label"].value,
        prediction_opacity=sv.opacity["prediction"].value,
        uncertainty_opacity=sv.opacity["uncertainty"].value,
        spacing=(2.0, 1.0, 1.0),
    )


def test_viewer_layout(sv):
    assert isinstance(sv.widget, widgets.VBox)
    assert isinstance(sv.image_widget, widgets.Image) and sv.image_widget.format == "png"
    assert list(sv.plane.options) == ["axial", "coronal", "sagittal"]
    assert set(sv.opacity) == {"label", "prediction", "uncertainty"}  # no CAM given
    children = [c for row in sv.widget.children for c in getattr(row, "children", ())]
    children += sv.widget.children
    assert {sv.image_widget, sv.slider, sv.plane, sv.window, sv.window_readout, sv.legend} <= set(
        children
    )
    bundle = sv._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == sv.widget.model_id


def test_viewer_initial_image_is_rendered_slice(sv, volume):
    assert sv.slider.value == D // 2 and sv.slider.max == D - 1
    assert sv.window.value == pytest.approx(default_window(volume["image"]))
    np.testing.assert_array_equal(decode(sv.image_widget.value), expected_slice(sv, volume))


@pytest.mark.parametrize(
    "change",
    [
        lambda sv: setattr(sv.slider, "value", 2),
        lambda sv: setattr(sv.opacity["label"], "value", 0.9),
        lambda sv: setattr(sv.opacity["uncertainty"], "value", 0.0),
        lambda sv: setattr(sv.window, "value", (0.0, 120.0)),
    ],
    ids=["slider", "label-opacity", "uncertainty-opacity", "window"],
)
def test_viewer_control_changes_rerender(sv, volume, change):
    before = bytes(sv.image_widget.value)
    change(sv)
    assert bytes(sv.image_widget.value) != before
    np.testing.assert_array_equal(decode(sv.image_widget.value), expected_slice(sv, volume))


def test_plane_switch_recentres_the_slider(sv, volume):
    sv.slider.value = 1
    sv.plane.value = "sagittal"
    assert sv.slider.max == W - 1 and sv.slider.value == W // 2
    sv.slider.value = 30
    sv.plane.value = "coronal"
    assert sv.slider.max == H - 1 and sv.slider.value == H // 2
    png = decode(sv.image_widget.value)
    assert png.shape == (2 * D, W, 3)  # 2 mm slices, 1 mm pixels
    np.testing.assert_array_equal(png, expected_slice(sv, volume))
    sv.show(plane="axial")  # through show as well: the axial middle, not the coronal index
    assert (sv.plane.value, sv.slider.value, sv.slider.max) == ("axial", D // 2, D - 1)
    np.testing.assert_array_equal(decode(sv.image_widget.value), expected_slice(sv, volume))
    assert sv.show(plane="sagittal", index=3) is not None and sv.slider.value == 3


def test_one_render_per_change(sv, monkeypatch):
    calls = []
    compose = viewer._compose
    monkeypatch.setattr(viewer, "_compose", lambda *a, **k: calls.append(a[1]) or compose(*a, **k))
    sv.slider.value = 7
    sv.plane.value = "axial"  # unchanged: no render
    sv.slider.value = 7  # unchanged: no render
    sv.plane.value = "sagittal"  # re-centred on W // 2
    sv.slider.value = 20
    sv.plane.value = "axial"  # re-centred on D // 2, rendered once
    assert calls == [7, W // 2, 20, D // 2]


def test_controls_have_room_for_their_labels_and_window_readout(sv):
    controls = [sv.slider, sv.window, sv.plane, *sv.opacity.values()]
    widths = {c.style.description_width for c in controls}
    assert widths == {viewer.CONTROL_LABEL_WIDTH}
    # ~7 px per character of the longest description ("uncertainty α") fits the label width
    longest = max(len(c.description) for c in controls)
    assert 7 * longest <= int(viewer.CONTROL_LABEL_WIDTH.removesuffix("px"))
    assert not sv.window.readout and sv.window_readout.value == viewer.window_text(
        *sv.window.value, sv.window.step
    )
    sv.window.value = (12.5, 187.5)
    assert sv.window_readout.value == "12.5 – 187.5"  # step 0.2: one decimal


def test_window_text_precision():
    assert viewer.window_text(0.0, 1.0, 0.001) == "0.000 – 1.000"
    assert viewer.window_text(0.0123, 0.98765, 0.001) == "0.012 – 0.988"
    assert viewer.window_text(-160.0, 240.0, 4.0) == "-160 – 240"


def test_show_sets_state_and_returns_rendered_slice(sv, volume):
    rgb = sv.show(index=5, plane="sagittal")
    assert (sv.plane.value, sv.slider.value) == ("sagittal", 5)
    np.testing.assert_array_equal(rgb, expected_slice(sv, volume))
    np.testing.assert_array_equal(rgb, decode(sv.image_widget.value))
    with pytest.raises(ValueError, match="out of range"):
        sv.show(index=W)


def test_legend_lists_classes_present(sv, volume):
    legend = re.sub("<[^>]+>", " ", sv.legend.value)  # the visible text
    assert "liver" in legend and "kidney_left" in legend
    assert "spleen" not in legend and "background" not in legend
    assert matplotlib.colors.to_hex(class_color(1)) in sv.legend.value  # the swatch
    bare = SliceViewer(volume["image"], volume["label"], labels={"3": "left kidney"})
    assert "left kidney" in bare.legend.value and "liver" in bare.legend.value  # default name
