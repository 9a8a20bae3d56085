"""Reading and preprocessing (medssl_kit.data.io): axes, spacing, orientation, resampling,
intensity scaling, DICOM series."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medssl_kit.data import io
from medssl_kit.data.datasets import load_volumes
from medssl_kit.data.manifest import load_manifest, parse_manifest
from medssl_kit.errors import ManifestError

SPACING = (5.0, 0.8, 0.7)  # (z, y, x) mm, anisotropic on purpose


def write_nifti(path: Path, zyx: np.ndarray, spacing=SPACING, flip_xy: bool = False) -> None:
    """Store a (z, y, x) array as NIfTI (x, y, z); ``flip_xy`` writes it LPS-ordered."""
    sz, sy, sx = spacing
    xyz = np.ascontiguousarray(np.asarray(zyx).transpose(2, 1, 0))
    affine = np.diag([sx, sy, sz, 1.0])
    if flip_xy:  # same anatomy, stored right-to-left and anterior-to-posterior
        xyz = np.ascontiguousarray(xyz[::-1, ::-1])
        affine = np.diag([-sx, -sy, sz, 1.0])
        affine[:2, 3] = [(xyz.shape[0] - 1) * sx, (xyz.shape[1] - 1) * sy]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(xyz, affine), path)


def manifest_for(root: Path, cases: list[dict], **top) -> object:
    data = {
        "name": "io-test",
        "modality": "CT",
        "labels": {"0": "background", "1": "organ", "2": "other"},
        "intensity": {"window": [-200, 300]},
        "cases": cases,
        **top,
    }
    (root / "manifest.json").write_text(json.dumps(data))
    return load_manifest(root / "manifest.json")


def ramp(shape=(6, 10, 12)) -> np.ndarray:
    """Every voxel distinct: value = 10000·z + 100·y + x (int32)."""
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (10000 * z + 100 * y + x).astype(np.int32)


def test_nifti_round_trip_axes_and_spacing(tmp_path):
    array = ramp()
    write_nifti(tmp_path / "img.nii.gz", array)
    labels = (array % 3).astype(np.uint8)
    write_nifti(tmp_path / "lab.nii.gz", labels)
    m = manifest_for(
        tmp_path, [{"id": "a", "image": "img.nii.gz", "label": "lab.nii.gz", "split": "train"}]
    )
    raw = io.read_raw(m.cases[0], m)
    assert raw.image.shape == (1, 6, 10, 12)
    np.testing.assert_array_equal(raw.image[0].numpy(), array)
    np.testing.assert_array_equal(raw.label[0].numpy(), labels)
    assert raw.spacing == pytest.approx(SPACING)
    assert raw.shape == (6, 10, 12)

    vol = io.load_case(m.cases[0], m)
    assert vol.image.dtype == torch.float32 and vol.label.dtype == torch.int64
    assert vol.image.shape == (1, 6, 10, 12) and vol.label.shape == (1, 6, 10, 12)
    assert vol.spacing == pytest.approx(SPACING)
    np.testing.assert_array_equal(vol.label[0].numpy(), labels)
    assert (vol.case_id, vol.split, vol.source) == ("a", "train", None)
    np.testing.assert_allclose(vol.original_affine, np.diag([0.7, 0.8, 5.0, 1.0]))
    # The returned affine puts the volume back in register when saved as NIfTI (x, y, z).
    back = nib.Nifti1Image(vol.label[0].permute(2, 1, 0).numpy().astype(np.uint8), vol.affine)
    np.testing.assert_allclose(back.affine, nib.load(tmp_path / "lab.nii.gz").affine)


def test_lps_file_comes_out_in_ras_order(tmp_path):
    array = ramp()
    write_nifti(tmp_path / "ras.nii.gz", array)
    write_nifti(tmp_path / "lps.nii.gz", array, flip_xy=True)
    stored = np.asarray(nib.load(tmp_path / "lps.nii.gz").dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(stored, array[:, ::-1, ::-1])  # the file really is flipped
    m = manifest_for(
        tmp_path,
        [
            {"id": "ras", "image": "ras.nii.gz", "split": "pretrain"},
            {"id": "lps", "image": "lps.nii.gz", "split": "pretrain"},
        ],
    )
    ras, lps = (io.read_raw(c, m) for c in m.cases)
    np.testing.assert_array_equal(lps.image[0].numpy(), array)
    np.testing.assert_array_equal(ras.image[0].numpy(), lps.image[0].numpy())
    np.testing.assert_allclose(lps.affine, ras.affine, atol=1e-6)
    assert lps.spacing == pytest.approx(SPACING)


def test_resampling_changes_shape_and_keeps_labels_integer(tmp_path):
    shape = (10, 20, 24)
    image = np.full(shape, 40, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[3:7, 5:15, 6:18] = 1
    label[1:3, 2:6, 2:6] = 2
    write_nifti(tmp_path / "img.nii.gz", image)
    write_nifti(tmp_path / "lab.nii.gz", label)
    m = manifest_for(
        tmp_path, [{"id": "a", "image": "img.nii.gz", "label": "lab.nii.gz", "split": "train"}]
    )
    target = (2.5, 1.5, 1.3)
    vol = io.load_case(m.cases[0], m, target_spacing=target)
    # MONAI spans the first to the last voxel centre: n' = round((n - 1)·s / s' + 1)
    expected = (19, 11, 13)
    assert vol.shape == expected == io.resampled_shape(shape, SPACING, target)
    assert vol.label.shape == (1, *expected)
    assert vol.spacing == pytest.approx(target)
    assert vol.label.dtype == torch.int64
    assert set(vol.label.unique().tolist()) == {0, 1, 2}
    # halving the z spacing roughly doubles the labelled extent along z
    assert (vol.label == 1).any(dim=(0, 2, 3)).sum() in (7, 8, 9)
    # the manifest's target_spacing is the default
    m2 = parse_manifest({**m.to_dict(), "target_spacing": list(target)}, tmp_path)
    assert io.load_case(m2.cases[0], m2).shape == expected


def test_ct_window_clips_and_scales_to_unit_range(tmp_path):
    hu = np.array([-1000, -200, 50, 300, 2000, 0], dtype=np.int16).reshape(1, 2, 3)
    write_nifti(tmp_path / "img.nii.gz", hu)
    m = manifest_for(tmp_path, [{"id": "a", "image": "img.nii.gz", "split": "pretrain"}])
    vol = io.load_case(m.cases[0], m)
    expected = np.clip((hu.astype(np.float64) + 200) / 500, 0, 1)
    np.testing.assert_allclose(vol.image[0].numpy(), expected, atol=1e-6)
    assert vol.image.dtype == torch.float32 and vol.label is None


def test_mr_percentile_scaling(tmp_path):
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    values[0, 0, 0] = 1e6  # a hot outlier must not squash the range
    write_nifti(tmp_path / "img.nii.gz", values)
    m = manifest_for(
        tmp_path,
        [{"id": "a", "image": "img.nii.gz", "split": "pretrain"}],
        modality="MR",
        intensity={"percentiles": [0.5, 99.5]},
    )
    out = io.load_case(m.cases[0], m).image[0].numpy()
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0] == 1.0  # clipped
    np.testing.assert_allclose(out[5, 0, 0], (500 - lo) / (hi - lo), atol=1e-5)


def test_multichannel_nifti(tmp_path):
    chans = np.stack([ramp(), -ramp()], axis=-1)  # (z, y, x, 2)
    xyzc = np.ascontiguousarray(chans.transpose(2, 1, 0, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(xyzc, np.diag([0.7, 0.8, 5.0, 1.0])), tmp_path / "img.nii.gz")
    m = manifest_for(
        tmp_path,
        [{"id": "a", "image": "img.nii.gz", "split": "pretrain"}],
        modality="MR",
        channels=["T1", "T2"],
    )
    raw = io.read_raw(m.cases[0], m)
    assert raw.image.shape == (2, 6, 10, 12)
    np.testing.assert_array_equal(raw.image[1].numpy(), -ramp())
    assert io.load_case(m.cases[0], m).image.shape == (2, 6, 10, 12)


def write_dicom_series(folder: Path, hu: np.ndarray, spacing=(2.5, 0.8, 0.7)) -> list[Path]:
    """Write a (z, y, x) HU volume as an axial CT series (int16 + RescaleIntercept -1024),
    standard orientation: columns run towards the patient's left, rows towards posterior."""
    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    files = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-10.0, -20.0, 100.0 + k * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        files.append(folder / f"IM{k:04d}")  # real series often have no suffix
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def test_dicom_series_equals_the_array_written(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(5, 7, 6)).astype(np.int16)
    write_dicom_series(tmp_path / "series", hu)
    m = manifest_for(tmp_path, [{"id": "d", "image": "series", "split": "pretrain"}])
    raw = io.read_raw(m.cases[0], m)
    # DICOM is LPS: column index grows to the patient's left, row index to posterior; RAS order
    # reverses both in-plane axes.
    np.testing.assert_array_equal(raw.image[0].numpy(), hu[:, ::-1, ::-1])
    assert raw.spacing == pytest.approx((2.5, 0.8, 0.7))
    vol = io.load_case(m.cases[0], m)
    np.testing.assert_allclose(
        vol.image[0].numpy(), np.clip((hu[:, ::-1, ::-1] + 200.0) / 500.0, 0, 1), atol=1e-6
    )


def test_dicom_missing_slice_is_reported(tmp_path):
    hu = np.zeros((5, 4, 4), dtype=np.int16)
    files = write_dicom_series(tmp_path / "series", hu)
    files[2].unlink()
    m = manifest_for(tmp_path, [{"id": "d", "image": "series", "split": "pretrain"}])
    with pytest.raises(ManifestError, match="unevenly spaced.*missing") as info:
        io.read_raw(m.cases[0], m)
    assert "'d'" in str(info.value) and "series" in str(info.value)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "img.mha").write_bytes(b"not read")
    m = manifest_for(tmp_path, [{"id": "u", "image": "img.mha", "split": "pretrain"}])
    with pytest.raises(ManifestError, match="unsupported image file type"):
        io.load_case(m.cases[0], m)


def test_volume_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    write_nifti(tmp_path / "img.nii.gz", ramp().astype(np.int16))
    write_nifti(tmp_path / "lab.nii.gz", np.ones((6, 10, 12), np.uint8))
    m = manifest_for(
        tmp_path, [{"id": "a", "image": "img.nii.gz", "label": "lab.nii.gz", "split": "train"}]
    )
    cache = tmp_path / "cache"
    first = load_volumes(m, "train", cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp"))

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("medssl_kit.data.datasets.load_case", refuse)
    again = load_volumes(m, "train", cache_dir=cache)
    assert torch.equal(again[0].image, first[0].image)
    assert torch.equal(again[0].label, first[0].label)
    assert again[0].spacing == first[0].spacing
    np.testing.assert_array_equal(again[0].affine, first[0].affine)
    # other preprocessing → another entry
    with pytest.raises(AssertionError, match="decoded again"):
        load_volumes(m, "train", target_spacing=(2.0, 2.0, 2.0), cache_dir=cache)
    # a changed file → another entry
    write_nifti(tmp_path / "img.nii.gz", ramp().astype(np.int16) + 1)
    with pytest.raises(AssertionError, match="decoded again"):
        load_volumes(m, "train", cache_dir=cache)


# --- per-source label maps (pooled, partially labelled datasets) --------------------------------


def mapped_manifest(root: Path, label_file_zyx: np.ndarray, **label_map_source) -> object:
    """A manifest with three classes and source "S" (files numbered 1 = c, 2 = a, 7 = b)."""
    write_nifti(root / "img.nii.gz", np.zeros(label_file_zyx.shape, np.int16))
    write_nifti(root / "lab.nii.gz", label_file_zyx)
    return manifest_for(
        root,
        [
            {"id": "s", "image": "img.nii.gz", "label": "lab.nii.gz", "split": "train"}
            | label_map_source,
            {"id": "plain", "image": "img.nii.gz", "label": "lab.nii.gz", "split": "pretrain"},
        ],
        labels={"0": "background", "1": "a", "2": "b", "3": "c"},
        sources={
            "S": {"classes": [1, 2, 3], "label_map": {"1": 3, "2": 1, "7": 2}},
            "L": [1, 2],
        },
    )


def test_label_map_remaps_on_reading_voxel_for_voxel(tmp_path):
    rng = np.random.default_rng(4)
    stored = rng.choice(np.array([0, 1, 2, 7, 255], np.uint8), size=(6, 10, 12))
    m = mapped_manifest(tmp_path, stored, source="S")
    case = m.get_case("s")
    assert m.label_map(case) == {1: 3, 2: 1, 7: 2}
    assert m.label_map(m.get_case("plain")) is None  # no source: the file holds manifest classes
    # file value → manifest class; 0 and ignore_index 255 stay; 1 ↔ 2 swap uses the file's values
    lut = np.arange(256)
    lut[[1, 2, 7]] = [3, 1, 2]
    expected = lut[stored]
    vol = io.load_case(case, m)
    assert vol.label.dtype == torch.int64
    np.testing.assert_array_equal(vol.label[0].numpy(), expected)
    # read_raw keeps the file's values (validation checks them against the map)
    np.testing.assert_array_equal(io.read_raw(case, m).label[0].numpy(), stored)
    # validation counts voxels per manifest class
    checked = io.check_raw(io.read_raw(case, m), case, m)
    assert checked.problems == []
    values, counts = np.unique(expected, return_counts=True)
    assert checked.label_counts == dict(zip(values.tolist(), counts.tolist(), strict=True))
    # with resampling the map is applied too (nearest: only manifest classes come out)
    resampled = io.load_case(case, m, target_spacing=(2.5, 0.8, 0.7))
    assert set(resampled.label.unique().tolist()) == {0, 1, 2, 3, 255}
    assert resampled.label[0, ::2].numpy().tolist() == expected.tolist()
    # the same file in an unmapped case (no source) is read as it is: 7 is not a class there
    with pytest.raises(ManifestError, match="label value 7 is neither a class"):
        io.load_case(m.get_case("plain"), m)


def test_the_volume_cache_follows_an_edited_label_map(tmp_path):
    stored = np.zeros((4, 6, 5), np.uint8)
    stored[1, 2, 3], stored[2, 3, 4] = 1, 2
    m = mapped_manifest(tmp_path, stored, source="S")
    cache = tmp_path / "cache"
    first = {v.case_id: v for v in load_volumes(m, "train", cache_dir=cache)}["s"]
    assert (first.label[0, 1, 2, 3], first.label[0, 2, 3, 4]) == (3, 1)
    data = m.to_dict()
    data["sources"]["S"]["label_map"] = {"1": 1, "2": 3, "7": 2}  # same classes, other map
    data["base_dir"] = str(m.base_dir)
    (tmp_path / "edited.json").write_text(json.dumps(data))
    edited = load_manifest(tmp_path / "edited.json")
    again = {v.case_id: v for v in load_volumes(edited, "train", cache_dir=cache)}["s"]
    assert (again.label[0, 1, 2, 3], again.label[0, 2, 3, 4]) == (1, 3)


def test_label_map_applies_to_float_label_files_and_a_source_list_maps_nothing(tmp_path):
    stored = np.zeros((4, 6, 5), np.float32)
    stored[1, 2, 3], stored[2, 3, 4], stored[3, 0, 0] = 1.0, 2.0, 7.0
    m = mapped_manifest(tmp_path, stored, source="S")
    label = io.load_case(m.get_case("s"), m).label[0]
    assert (label[1, 2, 3], label[2, 3, 4], label[3, 0, 0]) == (3, 1, 2)
    assert int((label != 0).sum()) == 3
    listed = mapped_manifest(tmp_path / "list", (stored == 1).astype(np.uint8), source="L")
    assert listed.label_map(listed.get_case("s")) is None
    label = io.load_case(listed.get_case("s"), listed).label[0]
    assert label[1, 2, 3] == 1 and int(label.sum()) == 1


def test_remap_labels_widens_keeps_metadata_and_leaves_the_input_alone():
    label = torch.tensor([[0, 1, 2, 255]], dtype=torch.uint8)
    out = io.remap_labels(label, {1: 300, 2: 1})
    assert out.dtype == torch.int32 and out.tolist() == [[0, 300, 1, 255]]
    assert label.tolist() == [[0, 1, 2, 255]]
    assert io.remap_labels(label, {1: 1, 2: 2}) is label  # identity: nothing to do
    meta = MetaTensor(label, affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    mapped = io.remap_labels(meta, {2: 5})
    assert isinstance(mapped, MetaTensor) and mapped.tolist() == [[0, 1, 5, 255]]
    assert torch.equal(mapped.affine, meta.affine)
