"""Manifest schema, path resolution, validation summary and MSD import (data.manifest)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl_kit.cli import main
from medssl_kit.data.manifest import ManifestProblems, load_manifest, parse_manifest
from medssl_kit.data.msd import import_msd
from medssl_kit.data.validate import validate_manifest
from medssl_kit.errors import ManifestError

REPO = Path(__file__).resolve().parents[1]

FULL = {
    "name": "full",
    "description": "every key once",
    "modality": "CT",
    "base_dir": "data",
    "labels": {"0": "background", "1": "liver", "2": "spleen", "7": "lesion"},
    "ignore_index": 255,
    "intensity": {"window": [-200.0, 300.0]},
    "target_spacing": [2.5, 1.0, 1.0],
    "sources": {"A": [1, 7], "B": [2]},
    "generator": {"tool": "test", "seed": 3},
    "cases": [
        {"id": "c0", "image": "img/c0.nii.gz", "label": "lab/c0.nii.gz", "split": "train"},
        {"id": "c1", "image": "img/c1.nii.gz", "split": "pretrain"},
        {
            "id": "c2",
            "image": "img/c2.nii.gz",
            "label": "lab/c2.nii.gz",
            "split": "test",
            "source": "A",
        },
    ],
}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def write_nifti(path: Path, zyx: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine), path)


def folder_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_schema_round_trip(tmp_path):
    m = load_manifest(write_json(tmp_path / "m.json", FULL))
    assert m.to_dict() == FULL
    assert load_manifest(write_json(tmp_path / "again.json", m.to_dict())).to_dict() == FULL
    assert (m.name, m.modality, m.ignore_index) == ("full", "CT", 255)
    assert m.labels == {0: "background", 1: "liver", 2: "spleen", 7: "lesion"}
    assert (m.intensity.kind, m.intensity.low, m.intensity.high) == ("window", -200.0, 300.0)
    assert m.target_spacing == (2.5, 1.0, 1.0)
    assert m.foreground_classes == [1, 2, 7] and m.num_classes == 8 and m.num_channels == 1
    assert [c.id for c in m.split("train")] == ["c0"] and m.split("val") == []
    assert m.get_case("c2").source == "A"
    assert m.labelled_classes(m.get_case("c2")) == [1, 7]
    assert m.labelled_classes(m.get_case("c0")) == [1, 2, 7]
    assert m.labelled_classes(m.get_case("c1")) == []
    assert not m.get_case("c1").labelled and m.get_case("c1").label_path is None
    with pytest.raises(ManifestError, match="no such case"):
        m.get_case("nope")
    with pytest.raises(ValueError, match="unknown split"):
        m.split("training")


def test_defaults_for_optional_keys(tmp_path):
    minimal = {
        "name": "min",
        "modality": "MR",
        "labels": {"0": "bg", "1": "fg"},
        "cases": [{"id": "a", "image": "a.nii.gz", "split": "pretrain"}],
    }
    m = parse_manifest(minimal, tmp_path)
    assert m.base_dir == tmp_path and m.ignore_index == 255
    assert (m.intensity.kind, m.intensity.low, m.intensity.high) == ("percentiles", 0.5, 99.5)
    assert m.target_spacing is None and m.sources is None and m.path is None
    ct = parse_manifest({**minimal, "modality": "CT"}, tmp_path)
    assert ct.intensity.to_dict() == {"window": [-200.0, 300.0]}


def test_base_dir_resolution(tmp_path):
    data = {**FULL, "base_dir": "../shared/data"}
    m = load_manifest(write_json(tmp_path / "manifests" / "m.json", data))
    assert m.base_dir == tmp_path / "shared" / "data"
    assert m.cases[0].image_path == tmp_path / "shared" / "data" / "img" / "c0.nii.gz"
    assert m.cases[0].label_path == tmp_path / "shared" / "data" / "lab" / "c0.nii.gz"
    absolute = load_manifest(write_json(tmp_path / "x" / "m.json", {**FULL, "base_dir": "/srv/ct"}))
    assert absolute.cases[2].image_path == Path("/srv/ct/img/c2.nii.gz")
    default = {k: v for k, v in FULL.items() if k != "base_dir"}
    here = load_manifest(write_json(tmp_path / "y" / "m.json", default))
    assert here.cases[0].image_path == tmp_path / "y" / "img" / "c0.nii.gz"
    # a folder holding manifest.json can be given instead of the file
    write_json(tmp_path / "z" / "manifest.json", FULL)
    assert load_manifest(tmp_path / "z").path == tmp_path / "z" / "manifest.json"


def test_relative_load_path_is_made_absolute(tmp_path, monkeypatch):
    write_json(tmp_path / "m.json", FULL)
    monkeypatch.chdir(tmp_path)
    m = load_manifest("m.json")
    assert m.path == tmp_path / "m.json" and m.base_dir == tmp_path / "data"


def test_every_schema_problem_is_reported_at_once(tmp_path):
    bad = json.loads(json.dumps(FULL))
    bad["colour"] = "blue"
    bad["ignore_index"] = "255"
    bad["cases"][0]["lable"] = "x.nii.gz"
    bad["cases"][1]["split"] = "training"
    bad["cases"][2]["source"] = "Z"
    path = write_json(tmp_path / "bad.json", bad)
    with pytest.raises(ManifestProblems) as info:
        load_manifest(path)
    messages = [str(p) for p in info.value.problems]
    assert len(messages) == 5 and all("bad.json" in msg for msg in messages)
    assert any("unknown top-level key 'colour'" in msg for msg in messages)
    assert any("'ignore_index' must be a non-negative integer" in msg for msg in messages)
    assert any("case 'c0'" in msg and "(did you mean 'label'?)" in msg for msg in messages)
    assert any("case 'c1'" in msg and "'training'" in msg for msg in messages)
    assert any("case 'c2'" in msg and "source 'Z'" in msg for msg in messages)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"modality": "PET"}, "'modality' must be one of CT, MR"),
        ({"labels": {"1": "liver"}}, 'must name class "0"'),
        ({"labels": {"0": "bg", "one": "liver"}}, "'labels' key 'one'"),
        ({"intensity": {"window": [300, -200]}}, "low < high"),
        ({"intensity": {"level": [0, 1]}}, "unknown 'intensity' key 'level'"),
        ({"target_spacing": [1, 1]}, "'target_spacing' must be three positive numbers"),
        ({"sources": {"A": [0], "B": [2]}}, "not foreground classes"),
        ({"ignore_index": 1}, "also a class"),
        ({"cases": {}}, "'cases' must be a list"),
        ({"generator": "me"}, "'generator' must be an object"),
        ({"name": None}, "'name' must not be null"),
        ({"labels": None}, "'labels' must not be null"),
        ({"cases": None}, "'cases' must not be null"),
        ({"description": 3}, "'description' must be a non-empty string, got the number 3"),
    ],
)
def test_top_level_schema_errors(tmp_path, change, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(write_json(tmp_path / "m.json", {**FULL, **change}))


def test_unlabelled_case_outside_pretrain_is_rejected(tmp_path):
    data = json.loads(json.dumps(FULL))
    del data["cases"][0]["label"]
    with pytest.raises(ManifestError, match="split 'train' needs a label") as info:
        load_manifest(write_json(tmp_path / "m.json", data))
    assert "case 'c0'" in str(info.value)


def make_dataset(root: Path) -> Path:
    """Two small labelled cases per split, written as NIfTI, and their manifest."""
    cases = []
    rng = np.random.default_rng(0)
    for i, split in enumerate(["pretrain", "train", "val", "test"] * 2):
        image = rng.integers(-300, 300, size=(4 + i // 4, 12, 10)).astype(np.int16)
        label = np.zeros(image.shape, np.uint8)
        label[1:3, 2:6, 2:5] = 1
        label[2:4, 7:10, 6:9] = 2 if i % 2 else 0
        write_nifti(root / "images" / f"c{i}.nii.gz", image, spacing=(2.0 + i // 4, 0.8, 0.8))
        write_nifti(root / "labels" / f"c{i}.nii.gz", label, spacing=(2.0 + i // 4, 0.8, 0.8))
        cases.append(
            {
                "id": f"c{i}",
                "image": f"images/c{i}.nii.gz",
                "label": f"labels/c{i}.nii.gz",
                "split": split,
            }
        )
    data = {
        "name": "mini",
        "modality": "CT",
        "labels": {"0": "background", "1": "liver", "2": "spleen", "3": "unused"},
        "cases": cases,
    }
    return write_json(root / "manifest.json", data)


def test_validation_report_and_summary_table(tmp_path):
    path = make_dataset(tmp_path / "data")
    report = validate_manifest(load_manifest(path))
    assert report.ok and report.problems == []
    report.raise_if_failed()
    info = {i.case_id: i for i in report.cases}
    assert info["c5"].shape == (5, 12, 10) and info["c5"].spacing == pytest.approx((3, 0.8, 0.8))
    assert info["c0"].label_counts == {0: 480 - 24, 1: 24}
    assert info["c1"].label_counts == {0: 480 - 24 - 18, 1: 24, 2: 18}
    table = report.summary_table()
    lines = table.splitlines()
    row = next(line.split() for line in lines if line.startswith("train "))
    assert row[:4] == ["train", "2", "2", "0"] and row[4] == "4-5x12x10"
    assert "2.00-3.00 / 0.80 / 0.80" in table
    liver = next(line.split() for line in lines if " liver " in line)
    assert liver == ["1", "liver", "48", "48", "48", "48", "192"]
    spleen = next(line.split() for line in lines if " spleen " in line)
    assert spleen[-1] == "72"
    assert any(line.split()[:2] == ["3", "unused"] for line in lines)
    assert "OK: no problems found" in table
    # fixed width: the count table's rows line up
    counts = lines[lines.index("voxels per label") + 1 :]
    widths = {len(line) for line in counts[:4]}
    assert len(widths) == 1


def test_resampled_shapes_in_report_and_patch_check(tmp_path):
    path = make_dataset(tmp_path / "data")
    data = json.loads(path.read_text())
    data["target_spacing"] = [1.0, 0.8, 0.8]
    report = validate_manifest(parse_manifest(data, path.parent, path=path), patch_size=(8, 12, 10))
    # 4 slices at 2 mm → 7 at 1 mm (too few for the patch); 5 slices at 3 mm → 13
    assert {i.resampled_shape for i in report.cases} == {(7, 12, 10), (13, 12, 10)}
    assert sorted(p.case_id for p in report.problems) == ["c0", "c1", "c2", "c3"]
    assert all("after resampling" in str(p) for p in report.problems)
    table = report.summary_table()
    assert "resampled shape" in table and "7-13x12x10" in table and "FAILED: 4 problems" in table


def test_validation_says_what_the_manifest_can_be_used_for(tmp_path):
    path = make_dataset(tmp_path / "data")
    data = json.loads(path.read_text())
    full = validate_manifest(parse_manifest(data, path.parent, path=path))
    assert full.ok and full.uses == ("pretrain", "finetune") and full.notes == []
    assert full.use == "pre-training and fine-tuning"
    assert "use       pre-training and fine-tuning" in full.summary_table().splitlines()

    # pre-training cases alone: sound for pre-training, fine-tuning's missing splits a note
    data["cases"] = [c for c in data["cases"] if c["split"] == "pretrain"]
    m = parse_manifest(data, path.parent, path=path)
    for use in (None, "pretrain"):
        report = validate_manifest(m, use=use)
        assert report.ok and report.uses == ("pretrain",) and report.use == "pre-training only"
        assert (
            len(report.notes) == 1
            and "splits 'train' and 'test' have no cases" in (report.notes[0])
        )
        assert f"note      {report.notes[0]}" in report.summary_table()
    problems = validate_manifest(m, use="finetune").problems
    assert len(problems) == 1 and problems[0].case_id is None and problems[0].path == str(path)
    assert "splits 'train' and 'test' have no cases" in str(problems[0])
    assert str(problems[0]).endswith("so the manifest can be used for pre-training only")
    # further splits can be required on top of the use
    problems = validate_manifest(m, splits_required=("pretrain", "val")).problems
    assert [str(p).split(": ", 1)[1] for p in problems] == [
        "split 'val' has no cases (required splits: pretrain, val)"
    ]
    with pytest.raises(ValueError, match="unknown use 'training'"):
        validate_manifest(m, use="training")

    # val and test cases alone: nothing to pre-train on, an error whatever the use
    data = json.loads(path.read_text())
    data["cases"] = [c for c in data["cases"] if c["split"] in ("val", "test")]
    report = validate_manifest(parse_manifest(data, path.parent, path=path))
    assert report.uses == () and report.use == "nothing yet"
    assert len(report.problems) == 1 and "no case in split 'pretrain' or 'train'" in str(
        report.problems[0]
    )


def write_msd(root: Path, n_train=10, n_test=2, modality=None, channels=1) -> Path:
    task = root / "Task99_Fake"
    training = []
    for i in range(n_train):
        shape = (3, 6, 5) if channels == 1 else (3, 6, 5, channels)
        img = np.zeros(shape, np.int16)
        nib.save(nib.Nifti1Image(img, np.eye(4)), _mk(task / "imagesTr" / f"fk_{i:03d}.nii.gz"))
        lab = np.zeros((3, 6, 5), np.uint8)
        lab[1, 1, 1] = 1
        nib.save(nib.Nifti1Image(lab, np.eye(4)), _mk(task / "labelsTr" / f"fk_{i:03d}.nii.gz"))
        training.append(
            {"image": f"./imagesTr/fk_{i:03d}.nii.gz", "label": f"./labelsTr/fk_{i:03d}.nii.gz"}
        )
    # macOS resource forks, as in the real MSD archives: not listed, never imported
    (task / "imagesTr" / "._fk_000.nii.gz").write_bytes(b"\x00junk")
    test = []
    for i in range(n_test):
        shape = (3, 6, 5) if channels == 1 else (3, 6, 5, channels)
        nib.save(
            nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)),
            _mk(task / "imagesTs" / f"fk_{100 + i:03d}.nii.gz"),
        )
        test.append(f"./imagesTs/fk_{100 + i:03d}.nii.gz")
    meta = {
        "name": "Fake",
        "description": "fake task",
        "tensorImageSize": "3D",
        "modality": modality or {"0": "CT"},
        "labels": {"0": "background", "1": "thing"},
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    write_json(task / "dataset.json", meta)
    return task


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_import_msd(tmp_path):
    task = write_msd(tmp_path / "msd")
    before = folder_hash(task)
    out = tmp_path / "manifests" / "fake.json"
    assert import_msd(task, out, seed=1) == out
    m = load_manifest(out)
    data = json.loads(out.read_text())
    assert data["base_dir"] == "../msd/Task99_Fake"
    assert m.base_dir == task
    assert (m.name, m.modality, m.description) == ("Fake", "CT", "fake task")
    assert m.intensity.to_dict() == {"window": [-200.0, 300.0]}
    assert m.labels == {0: "background", 1: "thing"}
    counts = {s: len(m.split(s)) for s in ("pretrain", "train", "val", "test")}
    assert counts == {"pretrain": 5 + 2, "train": 2, "val": 1, "test": 2}
    unlabelled = [c for c in m.cases if c.label is None]
    assert sorted(c.id for c in unlabelled) == ["fk_100", "fk_101"]
    assert all(c.split == "pretrain" and c.image.startswith("imagesTs/") for c in unlabelled)
    assert m.get_case("fk_003").image == "imagesTr/fk_003.nii.gz"
    assert m.get_case("fk_003").label_path == task / "labelsTr" / "fk_003.nii.gz"
    assert validate_manifest(m).ok
    assert folder_hash(task) == before  # the task folder is only read

    # same seed → same split; another seed → another split
    again = import_msd(task, tmp_path / "again.json", seed=1)
    other = import_msd(task, tmp_path / "other.json", seed=2)
    splits = {
        p: {c["id"]: c["split"] for c in json.loads(p.read_text())["cases"]}
        for p in (out, again, other)
    }
    assert splits[out] == splits[again] and splits[out] != splits[other]

    # never overwrite without asking
    stamp = out.read_bytes()
    with pytest.raises(ManifestError, match="exists already") as info:
        import_msd(task, out, seed=2)
    assert "fake.json" in str(info.value) and out.read_bytes() == stamp
    import_msd(task, out, seed=2, overwrite=True)
    assert json.loads(out.read_text())["cases"] != json.loads(stamp)["cases"]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ManifestError, match="inside the task folder"):
        import_msd(task, task / "manifest.json")
    assert folder_hash(task) == before


def test_import_msd_multimodal_mr(tmp_path):
    modality = {"0": "FLAIR", "1": "T1w"}
    task = write_msd(tmp_path, n_train=5, n_test=0, modality=modality, channels=2)
    out = import_msd(task, tmp_path / "mm.json", window=(-100, 100))
    m = load_manifest(out)
    assert m.modality == "MR" and m.channels == ["FLAIR", "T1w"] and m.num_channels == 2
    assert m.intensity.to_dict() == {"percentiles": [0.5, 99.5]}
    assert validate_manifest(m).ok  # 4-D images are read as two channels


def test_import_msd_errors(tmp_path):
    with pytest.raises(ManifestError, match="no dataset.json"):
        import_msd(tmp_path, tmp_path.parent / "x.json")
    task = write_msd(tmp_path, n_train=4)
    os.remove(task / "labelsTr" / "fk_002.nii.gz")
    with pytest.raises(ManifestError, match="do not exist: labelsTr/fk_002.nii.gz"):
        import_msd(task, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
    mixed = write_msd(tmp_path / "mixed", modality={"0": "CT", "1": "PET"})
    with pytest.raises(ManifestError, match="mixes CT"):
        import_msd(mixed, tmp_path / "m.json")
    tiny = write_msd(tmp_path / "tiny", n_train=2)
    with pytest.raises(ManifestError, match="too few"):
        import_msd(tiny, tmp_path / "m.json")


def test_template_manifest_follows_the_schema():
    m = load_manifest(REPO / "data_manifests" / "template.json")
    assert m.name and m.cases


# --- per-source label maps (pooled, partially labelled datasets) --------------------------------

MAPPED_SOURCES = {
    "A": [1, 7],
    "B": {"classes": [2], "label_map": {"1": 2, "3": 0, "4": 255}},
    "C": {"classes": [1, 7], "label_map": {"0": 0, "1": 7, "2": 1, "5": 1}},
}


def test_label_map_schema_round_trip(tmp_path):
    data = json.loads(json.dumps(FULL))
    data["sources"] = MAPPED_SOURCES
    data["cases"][0]["source"] = "B"
    data["cases"][2]["source"] = "C"
    m = load_manifest(write_json(tmp_path / "m.json", data))
    assert m.sources == {"A": [1, 7], "B": [2], "C": [1, 7]}
    assert m.label_maps == {"B": {1: 2, 3: 0, 4: 255}, "C": {0: 0, 1: 7, 2: 1, 5: 1}}
    assert m.label_map(m.get_case("c0")) == {1: 2, 3: 0, 4: 255}
    assert m.label_map(m.get_case("c1")) is None  # no source
    assert m.labelled_classes(m.get_case("c0")) == [2]
    assert m.labelled_classes(m.get_case("c2")) == [1, 7]
    assert m.to_dict() == data
    again = load_manifest(write_json(tmp_path / "again.json", m.to_dict()))
    assert again == parse_manifest(m.to_dict(), tmp_path, path=again.path)
    assert again.to_dict() == data and again.label_maps == m.label_maps
    assert parse_manifest(m.to_dict(), tmp_path, path=m.path) == m
    # list-only sources keep no label maps at all
    assert load_manifest(write_json(tmp_path / "plain.json", FULL)).label_maps is None


def _mapped(**spec_of_b) -> dict:
    data = json.loads(json.dumps(FULL))
    data["sources"] = {"A": [1, 7], "B": spec_of_b}
    data["cases"][0]["source"] = "B"
    return data


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"classes": [2], "labelmap": {"1": 2}},
            "unknown 'sources.B' key 'labelmap' (did you mean 'label_map'?)",
        ),
        ({"classes": [2], "label_map": {"1": 2}, "map": {}}, "unknown 'sources.B' key 'map'"),
        ({"classes": [2]}, "'sources.B' lacks the key 'label_map'"),
        ({"label_map": {"1": 2}}, "'sources.B' lacks the key 'classes'"),
        ({"classes": [2], "label_map": {"one": 2}}, "'sources.B.label_map' key 'one' must be"),
        ({"classes": [2], "label_map": {"1.0": 2}}, "'sources.B.label_map' key '1.0' must be"),
        ({"classes": [2], "label_map": {"-1": 2}}, "'sources.B.label_map' key '-1' must be"),
        ({"classes": [2], "label_map": {"1": 9}}, "maps file value 1 to 9, which is neither"),
        ({"classes": [2], "label_map": {"1": "2"}}, "entry '1' must map to a class index"),
        ({"classes": [2], "label_map": {"1": 2.0}}, "entry '1' must map to a class index"),
        ({"classes": [2], "label_map": {"1": 2, "255": 2}}, "maps ignore_index 255"),
        ({"classes": [2], "label_map": {"0": 2}}, "maps file value 0 to 2; 0 is background"),
        ({"classes": [2], "label_map": {"1": 2, "01": 7}}, "lists the file value 1 twice"),
        ({"classes": [2], "label_map": {}}, "'sources.B.label_map' must be a non-empty object"),
        ({"classes": [2], "label_map": [[1, 2]]}, "'sources.B.label_map' must be a non-empty"),
        ({"classes": [2, 7], "label_map": {"1": 2}}, "'sources.B.classes' [2, 7] differs"),
        ({"classes": [9], "label_map": {"1": 2}}, "'sources.B.classes' lists [9], which are not"),
        ({"classes": [], "label_map": {"1": 2}}, "'sources.B.classes' must be a non-empty list"),
    ],
)
def test_label_map_schema_errors(tmp_path, spec, message):
    path = write_json(tmp_path / "m.json", _mapped(**spec))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert not isinstance(info.value, ManifestProblems), str(info.value)  # one problem only
    assert message in str(info.value) and "m.json" in str(info.value)


def test_a_source_must_be_a_list_or_an_object(tmp_path):
    data = json.loads(json.dumps(FULL))
    data["sources"]["B"] = "2"
    with pytest.raises(ManifestError, match=r"'sources.B' must be a list of class indices .* or"):
        load_manifest(write_json(tmp_path / "m.json", data))


def test_label_map_errors_are_reported_with_the_others(tmp_path):
    data = _mapped(classes=[2], label_map={"x": 2, "3": 8})
    data["colour"] = "blue"
    with pytest.raises(ManifestProblems) as info:
        load_manifest(write_json(tmp_path / "m.json", data))
    messages = [str(p) for p in info.value.problems]
    assert len(messages) == 3, messages  # the case of source B is not reported on top
    assert any("key 'x'" in msg for msg in messages)
    assert any("file value 3 to 8" in msg for msg in messages)


# --- the worked example: data_manifests/pooled_liver_spleen_kits.json ---------------------------

EXAMPLE = REPO / "data_manifests" / "pooled_liver_spleen_kits.json"
# Each source's file layout, as its archive unpacks, and the label values its files hold.
EXAMPLE_LAYOUT = {
    "liver": (
        r"Task03_Liver/imagesTr/(liver_\d+)\.nii\.gz",
        r"Task03_Liver/labelsTr/(liver_\d+)\.nii\.gz",
    ),
    "spleen": (
        r"Task09_Spleen/imagesTr/(spleen_\d+)\.nii\.gz",
        r"Task09_Spleen/labelsTr/(spleen_\d+)\.nii\.gz",
    ),
    "kits": (
        r"kits19/data/(case_\d{5})/imaging\.nii\.gz",
        r"kits19/data/(case_\d{5})/segmentation\.nii\.gz",
    ),
}
# Stand-in label files: voxels per value of the dataset's own numbering (MSD Liver: 1 liver,
# 2 tumour; MSD Spleen: 1 spleen; KiTS19: 1 kidney, 2 tumour).
STAND_IN_VOXELS = {"liver": {1: 40, 2: 6}, "spleen": {1: 25}, "kits": {1: 18, 2: 4}}


def _stand_in_label(counts: dict[int, int], shape=(8, 16, 16)) -> np.ndarray:
    label = np.zeros(int(np.prod(shape)), np.uint8)
    start = 17
    for value, n in counts.items():
        label[start : start + n] = value
        start += n + 5
    return label.reshape(shape)


def build_example_stand_in(root: Path) -> Path:
    """Tiny NIfTI stand-ins at the example's exact paths, and a copy of the example manifest
    next to them (only ``base_dir`` changed); return the copy's path."""
    data = json.loads(EXAMPLE.read_text())
    rng = np.random.default_rng(0)
    for case in data["cases"]:
        image_pattern, label_pattern = EXAMPLE_LAYOUT[case["source"]]
        image_match = re.fullmatch(image_pattern, case["image"])
        label_match = re.fullmatch(label_pattern, case["label"])
        assert image_match and label_match, case
        assert image_match[1] == label_match[1] == case["id"], case
        image = rng.integers(-200, 300, size=(8, 16, 16)).astype(np.int16)
        write_nifti(root / case["image"], image, spacing=(2.5, 0.8, 0.8))
        label = _stand_in_label(STAND_IN_VOXELS[case["source"]])
        write_nifti(root / case["label"], label, spacing=(2.5, 0.8, 0.8))
    data["base_dir"] = "."
    return write_json(root / EXAMPLE.name, data)


def test_pooled_example_manifest_validates_in_the_pooled_label_space(tmp_path, capsys):
    raw = json.loads(EXAMPLE.read_text())
    assert raw["base_dir"] == "../data/pooled"
    m = load_manifest(EXAMPLE)
    assert m.labels == {
        0: "background",
        1: "liver",
        2: "liver tumour",
        3: "spleen",
        4: "kidney",
        5: "kidney tumour",
    }
    assert m.sources == {"liver": [1, 2], "spleen": [3], "kits": [4, 5]}
    assert m.label_maps == {"liver": {1: 1, 2: 2}, "spleen": {1: 3}, "kits": {1: 4, 2: 5}}
    assert {c.split for c in m.cases} == {"pretrain"}
    per_source = {s: sum(c.source == s for c in m.cases) for s in m.sources}
    assert min(per_source.values()) >= 2 and all(c.labelled for c in m.cases)

    path = build_example_stand_in(tmp_path / "pooled")
    before = folder_hash(tmp_path / "pooled")
    stand_in = load_manifest(path)
    assert stand_in.to_dict() == {**m.to_dict(), "base_dir": "."}
    report = validate_manifest(stand_in, splits_required=("pretrain",))
    assert report.ok, [str(p) for p in report.problems]
    expected = {c: 0 for c in range(6)}
    for case in stand_in.cases:
        for value, n in STAND_IN_VOXELS[case.source].items():
            expected[stand_in.label_maps[case.source][value]] += n
    assert expected == {
        0: 0,
        1: 40 * per_source["liver"],
        2: 6 * per_source["liver"],
        3: 25 * per_source["spleen"],
        4: 18 * per_source["kits"],
        5: 4 * per_source["kits"],
    }
    totals = {c: 0 for c in range(6)}
    for info in report.cases:
        for value, n in info.label_counts.items():
            totals[value] += n
    assert {c: n for c, n in totals.items() if c} == {c: n for c, n in expected.items() if c}
    assert set(totals) == set(range(6))  # nothing outside the pooled label space
    lines = report.summary_table().splitlines()
    spleen = next(line.split() for line in lines if line.split()[:2] == ["3", "spleen"])
    assert spleen[-1] == str(expected[3])
    kidney = next(line.split() for line in lines if line.split()[:2] == ["4", "kidney"])
    assert kidney[-1] == str(expected[4])
    assert any(line.split()[:1] == ["kits"] and "1->4, 2->5" in line for line in lines)

    # the CLI agrees: exit 0 for the pre-training pool, which is what it is for
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "OK: no problems found" in out and "use       pre-training only" in out and err == ""
    assert folder_hash(tmp_path / "pooled") == before  # validation only reads
