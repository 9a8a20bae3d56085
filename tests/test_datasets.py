"""Slice, slice-sequence and patch datasets over in-memory volumes (medssl_kit.data.datasets)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medssl_kit.data.datasets import (
    PatchDataset,
    SliceDataset,
    SliceSequenceDataset,
    known_labels,
    load_volumes,
)
from medssl_kit.data.io import CaseVolume
from medssl_kit.data.manifest import load_manifest
from medssl_kit.errors import ManifestError


def volume(case_id="v", depth=12, h=8, w=6, channels=1, label=True, empty=()) -> CaseVolume:
    """A volume whose slice j holds the value 0.1 + j / 100 everywhere (0 for ``empty`` slices)."""
    values = 0.1 + torch.arange(depth, dtype=torch.float32) / 100
    values[list(empty)] = 0
    image = values.view(1, depth, 1, 1).expand(channels, depth, h, w).contiguous()
    lab = None
    if label:
        lab = (torch.arange(depth) % 3).view(1, depth, 1, 1).expand(1, depth, h, w).contiguous()
    return CaseVolume(
        case_id=case_id,
        image=image,
        label=lab,
        spacing=(2.0, 0.8, 0.8),
        affine=np.eye(4),
        original_affine=np.eye(4),
        split="train",
    )


def slice_index(t: torch.Tensor) -> int:
    """Recover j from a slice of :func:`volume`."""
    return int(round((float(t.flatten()[0]) - 0.1) * 100))


def test_slice_dataset_counts_shapes_context():
    vols = [volume("a", depth=12), volume("b", depth=5, empty=(0, 4))]
    ds = SliceDataset(vols, context=2, skip_empty=True)
    assert len(ds) == 12 + 3
    item = ds[0]
    assert item["image"].shape == (5, 8, 6) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 8, 6) and item["label"].dtype == torch.int64
    assert (item["case_id"], item["slice"]) == ("a", 0)
    assert item["spacing"].tolist() == [2.0, 0.8, 0.8]
    # neighbours are clamped at the ends: slice 0 with context 2 → 0, 0, 0, 1, 2
    assert [slice_index(c) for c in item["image"]] == [0, 0, 0, 1, 2]
    mid = ds[5]
    assert [slice_index(c) for c in mid["image"]] == [3, 4, 5, 6, 7]
    assert int(mid["label"][0, 0, 0]) == 5 % 3
    # empty-body slices of "b" are skipped
    assert [ds[i]["slice"] for i in range(12, 15)] == [1, 2, 3]
    assert len(SliceDataset(vols, skip_empty=False)) == 17


def test_slice_dataset_multichannel_and_unlabelled():
    ds = SliceDataset([volume(channels=2, label=False)], context=1, with_label=False)
    item = ds[3]
    assert item["image"].shape == (6, 8, 6) and "label" not in item
    with pytest.raises(ManifestError, match="has no label") as info:
        SliceDataset([volume("nolabel", label=False)], with_label=True)
    assert "nolabel" in str(info.value)


def test_items_never_alias_the_store_and_volumes_are_not_copied():
    vols = [volume("a"), volume("b")]
    pointers = [v.image.data_ptr() for v in vols]
    datasets = [
        SliceDataset(vols),
        SliceSequenceDataset(vols, t=2, plus=True),
        PatchDataset(vols, (4, 4, 4)),
    ]
    for ds in datasets:
        assert [v.image.data_ptr() for v in ds.volumes] == pointers
        assert all(a is b for a, b in zip(ds.volumes, vols, strict=True))
        item = ds[0]
        before = vols[0].image.clone()
        item["image"].add_(1)  # a consumer modifying its item in place
        assert torch.equal(vols[0].image, before)


def test_slice_sequence_targets_are_exactly_j_minus_plus_t():
    t = 3
    ds = SliceSequenceDataset([volume(depth=15)], t=t, ends="skip")
    assert [ds[i]["slice"] for i in range(len(ds))] == list(range(t, 15 - t))
    for i in range(len(ds)):
        item = ds[i]
        j = item["slice"]
        assert slice_index(item["image"]) == j
        assert slice_index(item["prev"]) == j - t
        assert slice_index(item["next"]) == j + t
        assert "other" not in item
    clamp = SliceSequenceDataset([volume(depth=15)], t=t, ends="clamp")
    assert len(clamp) == 15
    first, last = clamp[0], clamp[14]
    assert (slice_index(first["prev"]), slice_index(first["next"])) == (0, t)
    assert (slice_index(last["prev"]), slice_index(last["next"])) == (14 - t, 14)


@pytest.mark.parametrize("ends", ["skip", "clamp"])
def test_slice_sequence_plus_k_never_inside_the_window(ends):
    t, depth = 2, 11
    ds = SliceSequenceDataset([volume(depth=depth)], t=t, plus=True, ends=ends, seed=7)
    seen: dict[int, set[int]] = {}
    for epoch in range(40):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            j, k = item["slice"], item["k"]
            assert slice_index(item["other"]) == k
            assert 0 <= k < depth
            assert not (j - t <= k <= j + t)
            assert j - 2 * t <= k <= j + 2 * t
            seen.setdefault(j, set()).add(k)
    # every allowed k occurs (uniform over the union, restricted to the volume)
    for j, ks in seen.items():
        allowed = {k for k in range(j - 2 * t, j + 2 * t + 1) if 0 <= k < depth and abs(k - j) > t}
        assert ks == allowed
    if ends == "skip":
        assert set(seen) == set(range(t, depth - t))


def test_slice_sequence_too_short_volume():
    with pytest.raises(ManifestError, match="smaller t"):
        SliceSequenceDataset([volume(depth=4)], t=2, ends="skip")


def test_seeded_draws_are_deterministic_and_worker_independent():
    vols = [volume("a", depth=20), volume("b", depth=16)]
    ds = SliceSequenceDataset(vols, t=2, plus=True, seed=3)
    ks = [ds[i]["k"] for i in range(len(ds))]
    assert ks == [
        SliceSequenceDataset(vols, t=2, plus=True, seed=3)[i]["k"] for i in range(len(ds))
    ]
    assert ks != [
        SliceSequenceDataset(vols, t=2, plus=True, seed=4)[i]["k"] for i in range(len(ds))
    ]
    ds.set_epoch(1)
    assert ks != [ds[i]["k"] for i in range(len(ds))]
    ds.set_epoch(0)
    # reversed access order gives the same draws; negative indices count from the end
    assert ks == [ds[i]["k"] for i in reversed(range(len(ds)))][::-1]
    assert ds[-1]["k"] == ks[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]

    patches = PatchDataset(vols, (4, 4, 4), samples_per_volume=6, seed=1)
    serial = [b["start"] for b in DataLoader(patches, batch_size=4, num_workers=0)]
    parallel = [b["start"] for b in DataLoader(patches, batch_size=4, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_patch_dataset_shapes_and_small_volume():
    vols = [volume("a", depth=12, h=10, w=9), volume("b", depth=8, h=8, w=8, label=False)]
    ds = PatchDataset(vols, (6, 5, 4), samples_per_volume=3, with_label=False)
    assert len(ds) == 6
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 6, 5, 4)
        assert item["case_id"] == ("a" if i < 3 else "b")
        z, y, x = item["start"].tolist()
        depth, h, w = vols[i // 3].shape
        assert 0 <= z <= depth - 6 and 0 <= y <= h - 5 and 0 <= x <= w - 4
        np.testing.assert_array_equal(
            item["image"][0].numpy(),
            vols[i // 3].image[0, z : z + 6, y : y + 5, x : x + 4].numpy(),
        )
    with pytest.raises(ManifestError, match="smaller than the patch size") as info:
        PatchDataset(vols, (9, 4, 4), with_label=False)
    assert "'b'" in str(info.value)


def blob_volume(case_id="blob") -> CaseVolume:
    """40×40×40 background with one 3×3×3 foreground cube (and an ignore region)."""
    label = torch.zeros(1, 40, 40, 40, dtype=torch.int64)
    label[0, 30:33, 5:8, 20:23] = 2
    label[0, 0:10, 0:10, 0:10] = 255
    return CaseVolume(
        case_id=case_id,
        image=torch.rand(1, 40, 40, 40),
        label=label,
        spacing=(1.0, 1.0, 1.0),
        affine=np.eye(4),
        original_affine=np.eye(4),
        split="train",
    )


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_patch_foreground_ratio(ratio):
    ds = PatchDataset([blob_volume()], (8, 8, 8), samples_per_volume=300, foreground_ratio=ratio)
    items = [ds[i] for i in range(len(ds))]
    has_fg = np.array([bool(((it["label"] > 0) & (it["label"] < 255)).any()) for it in items])
    flagged = np.array([it["foreground"] for it in items])
    assert np.all(has_fg[flagged])  # a foreground-centred patch contains the foreground
    assert abs(flagged.mean() - ratio) < 0.08
    if ratio == 0.0:
        assert has_fg.mean() < 0.05  # background centres rarely hit a 3³ blob in 40³
    # background centres never come from the ignore region
    for it in items:
        if not it["foreground"]:
            centre = it["start"] + 4
            assert not bool((centre < 10).all())


def test_patch_foreground_falls_back_when_absent():
    vol = blob_volume()
    vol.label.zero_()
    ds = PatchDataset([vol], (8, 8, 8), samples_per_volume=20, foreground_ratio=1.0)
    assert not any(ds[i]["foreground"] for i in range(len(ds)))


def test_load_volumes_reads_only_the_named_cases(tiny_phantom):
    manifest = load_manifest(tiny_phantom)
    train = [c.id for c in manifest.cases if c.split == "train"]
    wanted = [train[2], train[0]]
    vols = load_volumes(manifest, ["train"], case_ids=wanted)
    assert [v.case_id for v in vols] == [train[0], train[2]]  # manifest order
    assert torch.equal(vols[1].image, load_volumes(manifest, ["train"])[2].image)
    test_case = next(c.id for c in manifest.cases if c.split == "test")
    with pytest.raises(ManifestError, match=f"'{test_case}'.*not in split"):
        load_volumes(manifest, ["train"], case_ids=[train[0], test_case])


def test_known_labels_blank_ignored_voxels_and_classes_a_case_does_not_label(
    tiny_phantom, tmp_path
):
    raw = json.loads(tiny_phantom.read_text())
    raw["base_dir"] = str(tiny_phantom.parent)
    raw["sources"] = {"A": [1, 7]}
    raw["cases"][0]["source"] = "A"
    (tmp_path / "m.json").write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path / "m.json")
    label = torch.tensor([[0, 1, 2], [7, 255, 3]], dtype=torch.uint8)
    partial = known_labels(label, manifest, raw["cases"][0]["id"])
    assert partial.dtype == torch.int64
    assert partial.tolist() == [[0, 1, -1], [7, -1, -1]]
    full = known_labels(label, manifest, raw["cases"][1]["id"])
    assert full.tolist() == [[0, 1, 2], [7, -1, 3]]
