"""The ``medssl`` command line: subcommands, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medssl_kit
from medssl_kit.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from medssl_kit.config import PROFILES
from medssl_kit.errors import MedsslError
from medssl_kit.methods.registry import available_methods, get_method, unknown_methods_message


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def write_nifti(path: Path, zyx: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine), path)


def small_dataset(root: Path) -> Path:
    cases = []
    for i, split in enumerate(["pretrain", "train", "val", "test"]):
        label = np.zeros((4, 8, 8), np.uint8)
        label[1:3, 2:5, 2:5] = 1
        write_nifti(root / f"img{i}.nii.gz", np.full((4, 8, 8), 40, np.int16))
        write_nifti(root / f"lab{i}.nii.gz", label)
        cases.append(
            {"id": f"c{i}", "image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "split": split}
        )
    manifest = {"name": "cli", "modality": "CT", "labels": {"0": "bg", "1": "fg"}, "cases": cases}
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def fake_msd(root: Path) -> Path:
    task = root / "Task00_Cli"
    training = []
    for i in range(6):
        for folder in ("imagesTr", "labelsTr"):
            write_nifti(task / folder / f"x_{i}.nii.gz", np.zeros((3, 4, 4), np.uint8))
        training.append({"image": f"./imagesTr/x_{i}.nii.gz", "label": f"./labelsTr/x_{i}.nii.gz"})
    meta = {
        "name": "Cli",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "x"},
        "training": training,
        "test": [],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def test_help_and_version(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == EXIT_OK
    assert all(name in out for name in ("phantom", "validate", "import-msd", "Exit codes"))
    code, out, _ = run(["--version"], capsys)
    assert code == EXIT_OK and medssl_kit.__version__ in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["validate"],
        ["validate", "m.json", "--patch-size", "8", "x", "8"],
        ["validate", "m.json", "--require-splits", "training"],
        ["validate", "m.json", "--for", "training"],
        ["phantom"],
        ["phantom", "--out", "x", "--cases", "0"],
        ["phantom", "--out", "x", "--spacing", "1", "-1", "1"],
        ["phantom", "--out", "x", "--profile", "huge"],
        ["import-msd", "task"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run(argv, capsys)
    assert code == EXIT_USAGE and "error:" in err


def test_validate_ok_prints_the_table(tmp_path, capsys):
    path = small_dataset(tmp_path)
    code, out, err = run(["validate", path], capsys)
    assert code == EXIT_OK and err == ""
    assert "voxels per label" in out and "OK: no problems found" in out
    # a folder holding manifest.json works too; so does a patch size that fits
    code, _, _ = run(["validate", tmp_path, "--patch-size", "4", "8", "8"], capsys)
    assert code == EXIT_OK
    code, out, err = run(["validate", tmp_path, "--patch-size", "4", "9", "8"], capsys)
    assert code == EXIT_FAILED and "FAILED: 4 problems" in out
    assert len(err.splitlines()) == 4


def test_validate_a_pre_training_only_manifest(tmp_path, capsys):
    """Unlabelled scans alone: fit for pre-training (exit 0, said so), not for fine-tuning."""
    path = small_dataset(tmp_path)
    code, out, err = run(["validate", path], capsys)
    assert code == EXIT_OK and "use       pre-training and fine-tuning" in out and "note" not in out
    data = json.loads(path.read_text())
    data["cases"] = [
        {"id": f"scan{i}", "image": f"img{i}.nii.gz", "split": "pretrain"} for i in range(4)
    ]
    path.write_text(json.dumps(data))
    for extra in ([], ["--for", "pretrain"]):
        code, out, err = run(["validate", path, *extra], capsys)
        assert code == EXIT_OK and err == "" and "OK: no problems found" in out
        assert "use       pre-training only" in out
        assert "note      no fine-tuning: splits 'train' and 'test' have no cases" in out
    code, out, err = run(["validate", path, "--for", "finetune"], capsys)
    assert code == EXIT_FAILED and "use       pre-training only" in out
    assert err.splitlines() == [
        f"medssl: error: file '{path}': splits 'train' and 'test' have no cases; fine-tuning "
        "trains on labelled 'train' cases and evaluates on 'test' cases, so the manifest can be "
        "used for pre-training only"
    ]


def test_missing_manifest_is_one_line(tmp_path, capsys):
    code, out, err = run(["validate", tmp_path / "nope.json"], capsys)
    assert code == EXIT_FAILED and out == ""
    assert err.splitlines() == [
        f"medssl: error: file '{tmp_path / 'nope.json'}': manifest file does not exist"
    ]


def test_import_msd_command(tmp_path, capsys):
    task = fake_msd(tmp_path)
    out_path = tmp_path / "manifests" / "cli.json"
    code, out, _ = run(["import-msd", task, "--out", out_path, "--seed", "3"], capsys)
    assert code == EXIT_OK and "6 cases" in out and "train 1" in out
    first = out_path.read_text()
    code, _, err = run(["import-msd", task, "--out", out_path, "--seed", "4"], capsys)
    assert code == EXIT_FAILED and len(err.splitlines()) == 1 and "--overwrite" in err
    assert out_path.read_text() == first
    code, _, _ = run(["import-msd", task, "--out", out_path, "--seed", "4", "--overwrite"], capsys)
    assert code == EXIT_OK
    code, _, _ = run(["validate", out_path], capsys)
    assert code == EXIT_OK
    code, _, err = run(["import-msd", task, "--out", "x.json", "--window", "5", "1"], capsys)
    assert code == EXIT_USAGE and "LO < HI" in err


def test_os_errors_are_one_line(tmp_path, capsys):
    task = fake_msd(tmp_path)
    (tmp_path / "file").write_text("a file, not a folder")
    code, _, err = run(["import-msd", task, "--out", tmp_path / "file" / "m.json"], capsys)
    assert code == EXIT_FAILED
    assert len(err.splitlines()) == 1 and err.startswith("medssl: error: ")


def test_phantom_uses_the_profile_defaults(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_make_phantom(out_dir, **kwargs):
        calls.append(kwargs)
        return Path(out_dir) / "manifest.json"

    monkeypatch.setattr("medssl_kit.data.phantom.make_phantom", fake_make_phantom)
    smoke = PROFILES["smoke"].phantom
    code, out, _ = run(["phantom", "--out", tmp_path, "--profile", "smoke"], capsys)
    assert code == EXIT_OK and "manifest.json" in out
    assert calls[-1]["cases"] == smoke.cases and calls[-1]["shape"] == smoke.shape
    assert calls[-1]["split"] == smoke.split
    monkeypatch.setenv("MEDSSL_PROFILE", "smoke")
    argv = ["phantom", "--out", tmp_path, "--cases", "5", "--seed", "2", "--sources", "A,C"]
    argv += ["--modality", "mri", "--spacing", "3", "1", "1", "--workers", "1"]
    code, _, _ = run(argv, capsys)
    assert code == EXIT_OK
    assert calls[-1] == {
        "cases": 5,
        "seed": 2,
        "shape": smoke.shape,
        "spacing": (3.0, 1.0, 1.0),
        "modality": "mri",
        "sources": ["A", "C"],
        "split": None,  # the profile's counts are for its own case count
        "workers": 1,
    }


def test_phantom_then_validate(tmp_path, capsys):
    out_dir = tmp_path / "phantom"
    argv = ["phantom", "--out", out_dir, "--cases", "4", "--shape", "8", "32", "32"]
    code, out, _ = run([*argv, "--workers", "1"], capsys)
    assert code == EXIT_OK and "wrote 4 phantom cases" in out
    code, out, err = run(["validate", out_dir / "manifest.json"], capsys)
    assert code == EXIT_OK and err == "" and "OK: no problems found" in out
    # the generator refuses a folder whose manifest it did not write: one line, exit 1
    foreign = tmp_path / "foreign"
    small_dataset(foreign)
    code, _, err = run(
        ["phantom", "--out", foreign, "--cases", "4", "--shape", "8", "32", "32"], capsys
    )
    assert code == EXIT_FAILED and len(err.splitlines()) == 1
    # the generator's own argument checks are usage errors
    code, _, err = run([*argv[:3], "--cases", "2", "--shape", "8", "32", "32"], capsys)
    assert code == EXIT_USAGE and err.startswith("medssl: error: ") and "4 cases" in err


def test_python_dash_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medssl_kit", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and medssl_kit.__version__ in result.stdout


def test_export_target_names_match_the_models_layer():
    from medssl_kit.cli import EXPORT_TARGET_NAMES
    from medssl_kit.models.export import EXPORT_TARGETS

    assert set(EXPORT_TARGET_NAMES) == set(EXPORT_TARGETS)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from medssl_kit.cli import main; main(['--help']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_unknown_method_suggests_the_closest_name(tmp_path, capsys):
    code, out, err = run(
        ["pretrain", "--method", "pcrlv3", "--manifest", tmp_path, "--out", tmp_path / "r"], capsys
    )
    assert code == EXIT_FAILED and out == "" and not (tmp_path / "r").exists()
    assert err.splitlines() == [
        "medssl: error: unknown pre-training method 'pcrlv3' (did you mean 'pcrlv2'?); "
        f"available: {', '.join(available_methods())}"
    ]
    with pytest.raises(MedsslError, match=r"'simsam' \(did you mean 'simsiam'\?\)"):
        get_method("simsam")
    far = unknown_methods_message(["xyz", "byl"])
    assert far.startswith("unknown pre-training methods 'xyz', 'byl' (did you mean 'byol'?);")
