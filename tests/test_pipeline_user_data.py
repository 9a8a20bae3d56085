"""The smoke pipeline on a user's own data, not the phantom: an MRI-like Decathlon task.

Five 16×48×48 MR volumes (smooth random texture, two labelled structures, 3 × 0.8 × 0.8 mm),
four labelled in imagesTr and one unlabelled in imagesTs, imported with ``medssl import-msd``:
one pre-training case of each kind and one train, val and test case. So the notebooks meet none
of the phantom's facts (its seven labels, its split sizes, CT) and, with a single training case,
label budgets 1 and "all" select the same case.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from medssl_kit.cli import main

SHAPE = (16, 48, 48)  # z, y, x
LABELS = {"0": "background", "1": "cartilage", "2": "meniscus"}


def _write(path: Path, zyx: np.ndarray) -> None:
    affine = np.diag([0.8, 0.8, 3.0, 1.0])  # NIfTI axes are x, y, z
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine), path)


def write_mri_task(root: Path, n_labelled: int = 4, n_unlabelled: int = 1, seed: int = 0) -> Path:
    """A Decathlon-style task folder (dataset.json, imagesTr, labelsTr, imagesTs) of MR volumes:
    a smooth random texture around 300 (arbitrary units) with two blobs, one bright (label 1)
    and one dark (label 2), whose positions and sizes vary from case to case."""
    task = root / "Task98_KneeMR"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    training, tests = [], []
    for i in range(n_labelled + n_unlabelled):
        texture = gaussian_filter(rng.normal(size=SHAPE), 2.0)
        image = 300.0 + 80.0 * texture / texture.std()
        label = np.zeros(SHAPE, np.uint8)
        for value, (centre, radius, level) in enumerate(((16, 8, 700.0), (32, 7, 120.0)), 1):
            cy, cx = centre + rng.integers(-3, 4, size=2)
            r = radius + rng.integers(-1, 2)
            blob = ((y - cy) ** 2 + (x - cx) ** 2 <= r**2) & (z >= 2) & (z < SHAPE[0] - 2)
            label[blob] = value
            image[blob] += level - 300.0
        name = f"knee_{i:03d}.nii.gz"
        if i < n_labelled:
            _write(task / "imagesTr" / name, image.astype(np.float32))
            _write(task / "labelsTr" / name, label)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write(task / "imagesTs" / name, image.astype(np.float32))
            tests.append(f"./imagesTs/{name}")
    meta = {"name": "knee-mr", "modality": {"0": "MRI"}, "labels": LABELS}
    meta.update(numTraining=n_labelled, training=training, test=tests)
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def test_smoke_pipeline_runs_on_a_non_phantom_mri_manifest(tmp_path, capsys):
    task = write_mri_task(tmp_path / "data")
    manifest = tmp_path / "manifests" / "knee.json"
    assert main(["import-msd", str(task), "--out", str(manifest)]) == 0
    assert "pretrain 2, train 1, val 1, test 1" in capsys.readouterr().out
    assert main(["validate", str(manifest), "--for", "finetune"]) == 0
    assert "use       pre-training and fine-tuning" in capsys.readouterr().out

    out = tmp_path / "run"
    argv = ["run", "--profile", "smoke", "--out", str(out), "--manifest", str(manifest)]
    argv += ["--methods", "simsiam", "--labeled", "1,all", "--seeds", "0", "--quiet"]
    code = main(argv)
    printed, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads((out / "pipeline.json").read_text())
    names = ["data", "pretrain-simsiam", "finetune-scratch", "finetune-simsiam", "compare"]
    assert [s["name"] for s in record["stages"]] == names
    assert all(s["status"] == "completed" for s in record["stages"]), record["stages"]

    # budgets 1 and "all" select the one training case: one run per start, and a note
    for init in ("scratch", "simsiam"):
        assert [p.name for p in (out / "finetune" / init).iterdir()] == ["labeled-1_seed-0"]
        results = out / "finetune" / init / "labeled-1_seed-0" / "results.csv"
        rows = pd.read_csv(results, dtype=str)
        assert set(rows["labeled"]) == {"1"} and set(rows["class"]) == {"cartilage", "meniscus"}
        executed = (out / "notebooks" / f"finetune-{init}.ipynb").read_text()
        assert "label budgets 1 and 'all' both select 1 labelled 'train' case" in executed

    # the comparison lists both starts, says these are smoke numbers, and writes the report
    assert "| scratch | 1 |" in printed and "| simsiam | 1 |" in printed
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["method"]) == ["scratch", "simsiam"]
    report = (out / "report.html").read_text()
    assert "<table" in report and "scratch" in report and "simsiam" in report
    assert "These are smoke-profile runs" in report
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.startswith("> Note: These are smoke-profile runs.")
