"""Every bad input of DESIGN §2.6 gets a clear error, and nothing the user owns changes.

Each test breaks a small, valid dataset in one way and checks that:
- the package raises ManifestError naming the case id and the file;
- ``medssl validate`` prints exactly one ``medssl: error:`` line per problem, no traceback, and
  exits 1 (in-process through ``main``; two tests run the installed console script);
- the dataset folder is byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medssl_kit.cli import main
from medssl_kit.data.datasets import PatchDataset, load_volumes
from medssl_kit.data.io import load_case
from medssl_kit.data.manifest import load_manifest
from medssl_kit.data.validate import validate_manifest
from medssl_kit.errors import ManifestError

MEDSSL = Path(sys.executable).with_name("medssl")
SHAPE = (6, 16, 16)  # (z, y, x)
SPACING = (2.5, 0.8, 0.8)
CASE = "patient-7"  # the case each test breaks; its files are img_07 / seg_07
DICOM_CASE = "scan-9"


def write_nifti(path: Path, zyx: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> None:
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    affine[:3, 3] = origin
    nib.save(
        nib.Nifti1Image(np.ascontiguousarray(np.asarray(zyx).transpose(2, 1, 0)), affine), path
    )


def write_dicom_series(folder: Path, hu: np.ndarray) -> None:
    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * SPACING[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:04d}", enforce_file_format=True)


def image_array(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(0).integers(-500, 500, size=shape).astype(np.int16)


def label_array(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[1:4, 3:9, 4:10] = 1
    label[2:5, 10:14, 2:6] = 2
    return label


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A valid dataset (one labelled case per split, plus a DICOM pretrain scan); its manifest."""
    root = tmp_path / "user_data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    cases = []
    for number, (case_id, split) in enumerate(
        [("patient-1", "pretrain"), (CASE, "train"), ("patient-3", "val"), ("patient-4", "test")]
    ):
        n = 7 if case_id == CASE else number
        write_nifti(root / "images" / f"img_{n:02d}.nii.gz", image_array())
        write_nifti(root / "labels" / f"seg_{n:02d}.nii.gz", label_array())
        cases.append(
            {
                "id": case_id,
                "image": f"images/img_{n:02d}.nii.gz",
                "label": f"labels/seg_{n:02d}.nii.gz",
                "split": split,
            }
        )
    write_dicom_series(root / "dicom_09", image_array())
    cases.append({"id": DICOM_CASE, "image": "dicom_09", "split": "pretrain"})
    manifest = {
        "name": "bad-input",
        "modality": "CT",
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "ignore_index": 255,
        "intensity": {"window": [-200, 300]},
        "cases": cases,
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def folder_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def edit_manifest(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def check_cli(manifest: Path, capsys, needles, n_problems=1, extra=()) -> None:
    """``medssl validate`` prints one error line per problem, no traceback, and exits 1."""
    code = main(["validate", str(manifest), *extra])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == n_problems and all(line.startswith("medssl: error: ") for line in lines)
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)


def check_data_problem(manifest: Path, capsys, needles, case_id=CASE, extra=(), patch=None):
    """A problem found by reading the data: validation, load_case and the CLI all report it."""
    before = folder_hash(manifest.parent)
    m = load_manifest(manifest)
    report = validate_manifest(m, patch_size=patch)
    assert len(report.problems) == 1
    with pytest.raises(ManifestError) as info:
        report.raise_if_failed()
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert f"case '{case_id}'" in message and info.value.case_id == case_id
    assert not next(i for i in report.cases if i.case_id == case_id).ok
    if patch is None:  # training refuses the case too
        with pytest.raises(ManifestError) as loading:
            load_case(m.get_case(case_id), m)
        assert all(needle in str(loading.value) for needle in needles)
    check_cli(manifest, capsys, [f"case '{case_id}'", *needles], extra=extra)
    assert folder_hash(manifest.parent) == before


def check_schema_problem(manifest: Path, capsys, needles, n_problems=1):
    """A problem found when loading the manifest itself."""
    before = folder_hash(manifest.parent)
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    for needle in [manifest.name, *needles]:
        assert needle in message, (needle, message)
    check_cli(manifest, capsys, [manifest.name, *needles], n_problems=n_problems)
    assert folder_hash(manifest.parent) == before


def test_the_dataset_is_valid(dataset, capsys):
    assert main(["validate", str(dataset)]) == 0
    out, err = capsys.readouterr()
    assert "OK: no problems found" in out and err == ""
    volumes = load_volumes(load_manifest(dataset))
    assert [v.case_id for v in volumes] == ["patient-1", CASE, "patient-3", "patient-4", DICOM_CASE]


def test_missing_image_file(dataset, capsys):
    (dataset.parent / "images" / "img_07.nii.gz").unlink()
    check_data_problem(dataset, capsys, ["img_07.nii.gz", "image file does not exist"])


def test_missing_label_file(dataset, capsys):
    (dataset.parent / "labels" / "seg_07.nii.gz").unlink()
    check_data_problem(dataset, capsys, ["seg_07.nii.gz", "label file does not exist"])


def test_truncated_nifti(dataset, capsys):
    path = dataset.parent / "images" / "img_07.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    check_data_problem(dataset, capsys, ["img_07.nii.gz", "cannot read image", "file complete?"])


@pytest.mark.parametrize(
    "damage, message",
    [("junk", "not a DICOM file"), ("truncate", "pixel data is truncated")],
)
def test_corrupt_dicom_folder(dataset, capsys, damage, message):
    slice_file = dataset.parent / "dicom_09" / "IM0002"
    if damage == "junk":
        slice_file.write_bytes(b"this is not a DICOM slice\n" * 20)
    else:
        slice_file.write_bytes(slice_file.read_bytes()[:-100])
    check_data_problem(dataset, capsys, ["IM0002", message], case_id=DICOM_CASE)


def test_image_label_shape_mismatch(dataset, capsys):
    write_nifti(dataset.parent / "labels" / "seg_07.nii.gz", label_array((6, 16, 15)))
    check_data_problem(
        dataset, capsys, ["seg_07.nii.gz", "img_07.nii.gz", "label shape 6x16x15", "6x16x16"]
    )


def test_image_label_affine_mismatch(dataset, capsys):
    write_nifti(dataset.parent / "labels" / "seg_07.nii.gz", label_array(), origin=(5, 0, 0))
    check_data_problem(
        dataset, capsys, ["seg_07.nii.gz", "img_07.nii.gz", "not in the same space", "5.000 mm"]
    )


@pytest.mark.parametrize("value, needle", [(np.nan, "3 NaN voxel(s)"), (np.inf, "3 infinite")])
def test_non_finite_intensities(dataset, capsys, value, needle):
    image = image_array().astype(np.float32)
    image[2, 5, 5:8] = value
    write_nifti(dataset.parent / "images" / "img_07.nii.gz", image)
    check_data_problem(dataset, capsys, ["img_07.nii.gz", needle])


def test_label_value_not_in_labels(dataset, capsys):
    label = label_array()
    label[0, 0, 0] = 9
    write_nifti(dataset.parent / "labels" / "seg_07.nii.gz", label)
    check_data_problem(dataset, capsys, ["seg_07.nii.gz", "label value 9 is neither"])


def test_label_value_not_in_the_sources_label_map(dataset, capsys):
    def pool(m):  # the case comes from a dataset numbering its labels the other way round
        m["sources"] = {"msd": {"classes": [1, 2], "label_map": {"1": 2, "2": 1}}}
        m["cases"][1]["source"] = "msd"

    edit_manifest(dataset, pool)
    assert main(["validate", str(dataset)]) == 0  # 1 and 2 are in the map: all is well
    capsys.readouterr()
    label = label_array()
    label[0, 0, 0], label[0, 0, 1] = 3, 9  # 9 is not a class either: still one problem
    write_nifti(dataset.parent / "labels" / "seg_07.nii.gz", label)
    check_data_problem(
        dataset,
        capsys,
        ["seg_07.nii.gz", "label values [3, 9] are not in source 'msd''s label_map (1, 2)"],
    )


def test_non_integer_labels(dataset, capsys):
    label = label_array().astype(np.float32)
    label[3, 3, 3] = 1.5
    write_nifti(dataset.parent / "labels" / "seg_07.nii.gz", label)
    check_data_problem(dataset, capsys, ["seg_07.nii.gz", "non-integer values (e.g. 1.5)"])


def test_volume_smaller_than_patch(dataset, capsys):
    write_nifti(dataset.parent / "images" / "img_07.nii.gz", image_array((4, 16, 16)))
    write_nifti(dataset.parent / "labels" / "seg_07.nii.gz", label_array((4, 16, 16)))
    check_data_problem(
        dataset,
        capsys,
        ["img_07.nii.gz", "smaller than the patch size 5x16x16 along z"],
        extra=["--patch-size", "5", "16", "16"],
        patch=(5, 16, 16),
    )
    volumes = load_volumes(load_manifest(dataset), "train")
    with pytest.raises(ManifestError, match="smaller than the patch size") as info:
        PatchDataset(volumes, (5, 16, 16))
    assert f"case '{CASE}'" in str(info.value)


def test_empty_split(dataset, capsys):
    edit_manifest(
        dataset, lambda m: m.update(cases=[c for c in m["cases"] if c["split"] != "test"])
    )
    before = folder_hash(dataset.parent)
    report = validate_manifest(load_manifest(dataset), use="finetune")
    with pytest.raises(ManifestError, match="split 'test' has no cases") as info:
        report.raise_if_failed()
    assert "manifest.json" in str(info.value)
    check_cli(
        dataset, capsys, ["manifest.json", "split 'test' has no cases"], extra=["--for", "finetune"]
    )
    # without --for finetune the missing split is a note: the manifest is fit for pre-training
    assert main(["validate", str(dataset)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "use       pre-training only" in out
    assert "note      no fine-tuning: split 'test' has no cases" in out
    check_cli(dataset, capsys, ["split 'test' has no cases"], extra=["--require-splits", "test"])
    assert folder_hash(dataset.parent) == before


def test_unknown_top_level_key(dataset, capsys):
    edit_manifest(dataset, lambda m: m.update(colour="blue"))
    check_schema_problem(dataset, capsys, ["unknown top-level key 'colour'"])


def test_unknown_case_key(dataset, capsys):
    edit_manifest(dataset, lambda m: m["cases"][1].update(lable="labels/seg_07.nii.gz"))
    check_schema_problem(
        dataset, capsys, [f"case '{CASE}'", "unknown case key 'lable'", "did you mean 'label'"]
    )


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda m: m.update(ignore_index="255"), ["'ignore_index' must be a non-negative integer"]),
        (lambda m: m["cases"][1].update(split=3), [f"case '{CASE}'", "'split' must be a non"]),
        (lambda m: m.update(labels=["background"]), ["'labels' must be an object", "got a list"]),
    ],
)
def test_wrong_type(dataset, capsys, change, needles):
    edit_manifest(dataset, change)
    check_schema_problem(dataset, capsys, needles)


def test_several_schema_problems_one_line_each(dataset, capsys):
    def break_twice(m):
        m["colour"] = "blue"
        m["cases"][2]["split"] = "validation"

    edit_manifest(dataset, break_twice)
    check_schema_problem(dataset, capsys, ["'colour'", "case 'patient-3'"], n_problems=2)


def test_duplicate_case_ids(dataset, capsys):
    edit_manifest(dataset, lambda m: m["cases"][2].update(id=CASE))
    check_schema_problem(dataset, capsys, [f"case '{CASE}'", "duplicate case id"])


def test_malformed_json(dataset, capsys):
    text = dataset.read_text().replace('"split": "val"', '"split": "val",,')
    dataset.write_text(text)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if ",," in s)
    check_schema_problem(dataset, capsys, ["not valid JSON", f"line {line}"])


@pytest.mark.parametrize("damage", ["truncated image", "malformed json"])
def test_installed_console_script(dataset, damage):
    if damage == "truncated image":
        path = dataset.parent / "images" / "img_07.nii.gz"
        path.write_bytes(path.read_bytes()[:200])
        needles = [f"case '{CASE}'", "img_07.nii.gz", "cannot read image"]
    else:
        dataset.write_text(dataset.read_text()[:-30])
        needles = ["manifest.json", "not valid JSON"]
    before = folder_hash(dataset.parent)
    result = subprocess.run(
        [str(MEDSSL), "validate", str(dataset)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("medssl: error: ")
    assert all(needle in lines[0] for needle in needles)
    assert folder_hash(dataset.parent) == before
