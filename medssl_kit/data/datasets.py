"""Datasets over preprocessed volumes (§2.4).

:func:`load_volumes` decodes each case once into a list of :class:`~medssl_kit.data.io.CaseVolume`
(optionally through an on-disk cache); the datasets take that list and index into it without
copying the volumes, so several datasets over one list cost no extra memory. Items are fresh
tensors: changing an item never changes the stored volume.

Random draws are seeded per (seed, epoch, index) — call ``set_epoch`` at the start of each epoch —
so results do not depend on the number of DataLoader workers or on the order items are fetched.
(With ``persistent_workers=True`` the workers keep the epoch they started with.)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl_kit.atomic import atomic_path
from medssl_kit.data.io import CaseVolume, load_case
from medssl_kit.data.manifest import SPLITS, Case, Manifest, raise_problems, split_problems
from medssl_kit.errors import ManifestError

CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Loading and caching


def _file_stamp(path: Path | None) -> list[Any] | None:
    """Path, modification time and size of a file (or of a DICOM folder's files)."""
    if path is None:
        return None
    if path.is_dir():
        stats = [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
        return [
            str(path),
            max((s.st_mtime_ns for s in stats), default=0),
            sum(s.st_size for s in stats),
            len(stats),
        ]
    stat = path.stat()
    return [str(path), stat.st_mtime_ns, stat.st_size]


def _cache_file(
    cache_dir: Path, case: Case, manifest: Manifest, target: Sequence[float] | None
) -> Path | None:
    """Where this case's preprocessed tensors are cached (``None``: its files are missing)."""
    try:
        stamp = {
            "version": CACHE_VERSION,
            "id": case.id,
            "image": _file_stamp(case.image_path),
            "label": _file_stamp(case.label_path),
            "target_spacing": None if target is None else [float(s) for s in target],
            "intensity": manifest.intensity.to_dict(),
            "modality": manifest.modality,
            "channels": manifest.num_channels,
            "labels": sorted(manifest.labels),
            "ignore_index": manifest.ignore_index,
            "sources": manifest.sources,
            "source": case.source,
        }
        label_map = manifest.label_map(case)
        if label_map is not None:  # only then: earlier cache entries stay valid
            stamp["label_map"] = sorted(label_map.items())
    except OSError:
        return None  # load_case reports the missing file
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", case.id)
    return cache_dir / f"{safe_id}-{digest}.pt"


def _read_cache(path: Path, case: Case) -> CaseVolume | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # an unreadable entry is recomputed and replaced
        return None
    label = data["label"]
    return CaseVolume(
        case_id=case.id,
        image=data["image"],
        label=None if label is None else label.to(torch.int64),
        spacing=tuple(data["spacing"]),
        affine=data["affine"].numpy(),
        original_affine=data["original_affine"].numpy(),
        split=case.split,
        source=case.source,
    )


def _write_cache(path: Path, volume: CaseVolume) -> None:
    """Save atomically: a crash never leaves a half-written entry under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = volume.label
    if label is not None and label.numel() and int(label.min()) >= 0 and int(label.max()) <= 255:
        label = label.to(torch.uint8)  # 8× smaller on disk; widened again when read
    data = {
        "image": volume.image,
        "label": label,
        "spacing": list(volume.spacing),
        "affine": torch.from_numpy(np.asarray(volume.affine, dtype=np.float64)),
        "original_affine": torch.from_numpy(np.asarray(volume.original_affine, dtype=np.float64)),
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_volumes(
    manifest: Manifest,
    splits: str | Sequence[str] = SPLITS,
    target_spacing: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    case_ids: Sequence[str] | None = None,
) -> list[CaseVolume]:
    """Decode and preprocess every case of the given splits once, in manifest order.

    ``case_ids`` restricts that to the named cases (each must be in one of the splits), so a few
    labelled cases can be read from a large pool without decoding the rest.

    ``target_spacing`` (z, y, x) mm defaults to the manifest's. With ``cache_dir``, preprocessed
    tensors are stored there (one ``.pt`` file per case, written atomically) and reused while the
    case's files (path, modification time, size) and the preprocessing settings are unchanged;
    the folder holds only derived data and can be deleted at any time. ``workers`` threads decode
    in parallel. Every case that fails is reported (a ``ManifestProblems`` for several).
    """
    names = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    target = target_spacing if target_spacing is not None else manifest.target_spacing
    cache = None if cache_dir is None else Path(cache_dir)
    cases = [c for c in manifest.cases if c.split in names]
    if case_ids is not None:
        wanted = set(case_ids)
        missing = sorted(wanted - {c.id for c in cases})
        if missing:
            raise ManifestError(
                f"case(s) {missing} are not in split(s) {names}", path=manifest.path
            )
        cases = [c for c in cases if c.id in wanted]

    def one(case: Case) -> CaseVolume | ManifestError:
        entry = None if cache is None else _cache_file(cache, case, manifest, target)
        if entry is not None:
            cached = _read_cache(entry, case)
            if cached is not None:
                return cached
        try:
            volume = load_case(case, manifest, target)
        except ManifestError as err:
            return err
        if entry is not None:
            _write_cache(entry, volume)
        return volume

    if workers > 1 and len(cases) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, cases))
    else:
        results = [one(case) for case in cases]
    problems = [p for r in results if isinstance(r, ManifestError) for p in split_problems(r)]
    raise_problems(problems)
    return [r for r in results if isinstance(r, CaseVolume)]


def known_labels(label: torch.Tensor, manifest: Manifest, case_id: str) -> torch.Tensor:
    """``label`` as int64 with −1 wherever it is not known: ignored voxels and classes the case
    does not annotate (partially labelled data) — only background and its labelled classes stay."""
    label = label.long()
    known = torch.tensor([0, *manifest.labelled_classes(manifest.get_case(case_id))])
    return torch.where(torch.isin(label, known), label, -1)


# --------------------------------------------------------------------------------------------
# Datasets


def _check_volumes(volumes: Sequence[CaseVolume], with_label: bool) -> list[CaseVolume]:
    volumes = list(volumes)  # a new list of the same volumes: nothing is copied
    if not volumes:
        raise ManifestError("no volumes to build a dataset from; is the split empty?")
    if with_label:
        for volume in volumes:
            if volume.label is None:
                raise ManifestError(
                    "has no label, but this dataset was asked for labels (with_label=True); "
                    "pass with_label=False or use labelled cases only",
                    case_id=volume.case_id,
                )
    return volumes


class _SeededDataset(Dataset):
    """Random draws from ``numpy.random.default_rng([seed, epoch, index])``."""

    def __init__(self, seed: int):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws items use (call once per epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def _position(self, i: int) -> int:
        """``i`` as a non-negative index (negative ones count from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
        return i % n

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])


def _spacing(volume: CaseVolume) -> torch.Tensor:
    return torch.tensor(volume.spacing, dtype=torch.float64)


class SliceDataset(Dataset):
    """2D axial slices of the volumes, optionally with neighbouring slices as extra channels.

    Item: ``image`` float32 ``[C·(1+2·context), H, W]`` (per image channel, slices j−context …
    j+context, clamped at the volume's ends), ``label`` int64 ``[1, H, W]`` of slice j (when
    ``with_label``), ``case_id``, ``slice`` (j) and ``spacing`` (z, y, x mm, float64 ``[3]``).
    With ``skip_empty``, slices whose body (voxels above ``body_threshold`` in any channel) covers
    less than ``min_body_fraction`` of the slice are left out.
    """

    def __init__(
        self,
        volumes: Sequence[CaseVolume],
        context: int = 0,
        skip_empty: bool = True,
        with_label: bool = True,
        body_threshold: float = 0.05,
        min_body_fraction: float = 0.02,
    ):
        if context < 0:
            raise ValueError(f"context must be non-negative, got {context}")
        self.volumes = _check_volumes(volumes, with_label)
        self.context = context
        self.with_label = with_label
        rows = []
        for v, volume in enumerate(self.volumes):
            if skip_empty:
                body = (volume.image > body_threshold).any(dim=0).flatten(1)
                keep = torch.nonzero(body.float().mean(dim=1) >= min_body_fraction).flatten()
            else:
                keep = torch.arange(volume.shape[0])
            rows.append(torch.stack([torch.full_like(keep, v), keep], dim=1))
        self.index = torch.cat(rows)  # [N, 2]: (volume, slice)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, j = self.index[i].tolist()
        volume = self.volumes[v]
        if self.context:
            depth = volume.shape[0]
            neighbours = torch.arange(j - self.context, j + self.context + 1).clamp(0, depth - 1)
            image = volume.image[:, neighbours].flatten(0, 1)  # advanced indexing copies
        else:
            image = volume.image[:, j].clone()
        item: dict[str, Any] = {
            "image": image,
            "case_id": volume.case_id,
            "slice": j,
            "spacing": _spacing(volume),
        }
        if self.with_label:
            item["label"] = volume.label[:, j].clone()
        return item


class SliceSequenceDataset(_SeededDataset):
    """Slice j with slices j−t and j+t (SSMTL) and, with ``plus``, a further slice k (SSMTL+).

    Item: ``image`` (slice j), ``prev`` (slice j−t), ``next`` (slice j+t), each float32
    ``[C, H, W]``; ``slice`` (j), ``case_id``, ``spacing``; with ``plus`` also ``other`` (slice k)
    and ``k``, k drawn uniformly from [j−2t, j−t−1] ∪ [j+t+1, j+2t] restricted to the volume, so k
    never lies in [j−t, j+t]. ``ends="skip"`` keeps only the j whose neighbours j±t lie in the
    volume; ``ends="clamp"`` keeps every j and clamps j±t to the volume. With ``plus``, a j without
    any valid k is left out either way.
    """

    def __init__(
        self,
        volumes: Sequence[CaseVolume],
        t: int = 5,
        plus: bool = False,
        ends: str = "skip",
        seed: int = 0,
    ):
        super().__init__(seed)
        if t < 1:
            raise ValueError(f"t must be at least 1, got {t}")
        if ends not in ("skip", "clamp"):
            raise ValueError(f"ends must be 'skip' or 'clamp', got {ends!r}")
        self.volumes = _check_volumes(volumes, with_label=False)
        self.t, self.plus, self.ends = t, plus, ends
        rows = []
        for v, volume in enumerate(self.volumes):
            depth = volume.shape[0]
            j = torch.arange(depth)
            keep = torch.ones(depth, dtype=torch.bool)
            if ends == "skip":
                keep &= (j - t >= 0) & (j + t <= depth - 1)
            if plus:
                keep &= (j - t - 1 >= 0) | (j + t + 1 <= depth - 1)
            kept = j[keep]
            rows.append(torch.stack([torch.full_like(kept, v), kept], dim=1))
        self.index = torch.cat(rows)
        if len(self.index) == 0:
            depths = sorted({v.shape[0] for v in self.volumes})
            raise ManifestError(
                f"no slice of any volume has the neighbours t={t} needs (volumes have "
                f"{depths[0]}-{depths[-1]} slices); use a smaller t or ends='clamp'"
            )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._position(i)
        v, j = self.index[i].tolist()
        volume = self.volumes[v]
        depth, t = volume.shape[0], self.t
        item: dict[str, Any] = {
            "image": volume.image[:, j].clone(),
            "prev": volume.image[:, max(j - t, 0)].clone(),
            "next": volume.image[:, min(j + t, depth - 1)].clone(),
            "slice": j,
            "case_id": volume.case_id,
            "spacing": _spacing(volume),
        }
        if self.plus:
            low_start, low_count = max(j - 2 * t, 0), max(j - t - max(j - 2 * t, 0), 0)
            high_start = j + t + 1
            high_count = max(min(j + 2 * t, depth - 1) - high_start + 1, 0)
            r = int(self._rng(i).integers(low_count + high_count))
            k = low_start + r if r < low_count else high_start + r - low_count
            item["other"] = volume.image[:, k].clone()
            item["k"] = k
        return item


class PatchDataset(_SeededDataset):
    """3D patches, centred on a foreground voxel with probability ``foreground_ratio``.

    ``samples_per_volume`` patches per volume (item i comes from volume i // samples_per_volume).
    As in MONAI's ``RandCropByPosNegLabel``, a patch is centred on a voxel drawn uniformly among
    the foreground voxels (label > 0 and ≠ ``ignore_index``) or, otherwise, among the background
    voxels (label 0), then shifted to lie inside the volume; if the wanted kind does not occur,
    the other is used; volumes without a label get uniformly placed patches. Item: ``image``
    ``[C, pd, ph, pw]``, ``label`` ``[1, pd, ph, pw]`` (when ``with_label``), ``case_id``,
    ``start`` (z, y, x corner, int64 ``[3]``), ``foreground`` (whether the centre was a
    foreground voxel) and ``spacing``. ``patch_size`` is (z, y, x) voxels.
    """

    def __init__(
        self,
        volumes: Sequence[CaseVolume],
        patch_size: Sequence[int],
        samples_per_volume: int = 4,
        foreground_ratio: float = 0.5,
        seed: int = 0,
        with_label: bool = True,
        ignore_index: int = 255,
    ):
        super().__init__(seed)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(
                f"patch_size must be three positive integers (z, y, x), got {patch_size}"
            )
        if samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be at least 1, got {samples_per_volume}")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio must lie in [0, 1], got {foreground_ratio}")
        self.volumes = _check_volumes(volumes, with_label)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_volume = samples_per_volume
        self.foreground_ratio = foreground_ratio
        self.with_label = with_label
        self.ignore_index = ignore_index
        for volume in self.volumes:
            if any(s < p for s, p in zip(volume.shape, self.patch_size, strict=True)):
                raise ManifestError(
                    f"volume of {'x'.join(map(str, volume.shape))} voxels (z, y, x) is smaller "
                    f"than the patch size {'x'.join(map(str, self.patch_size))}; use a smaller "
                    "patch size or drop the case",
                    case_id=volume.case_id,
                )
        # Cumulative per-slice voxel counts of foreground and background, for uniform draws
        # without holding voxel coordinate lists (which can exceed the volume's own size).
        self._cumulative: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for volume in self.volumes:
            if volume.label is None:
                self._cumulative.append(None)
                continue
            label = volume.label[0]
            fg = self._is_foreground(label).sum(dim=(1, 2)).cumsum(0)
            bg = (label == 0).sum(dim=(1, 2)).cumsum(0)
            self._cumulative.append((fg, bg))

    def _is_foreground(self, label: torch.Tensor) -> torch.Tensor:
        return (label > 0) & (label != self.ignore_index)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def _draw(
        self,
        label: torch.Tensor,
        cumulative: torch.Tensor,
        foreground: bool,
        rng: np.random.Generator,
    ) -> tuple[int, int, int]:
        """A voxel drawn uniformly among the foreground (or background) voxels."""
        r = int(rng.integers(int(cumulative[-1])))
        z = int(torch.searchsorted(cumulative, torch.tensor(r), right=True))
        before = int(cumulative[z - 1]) if z > 0 else 0
        plane = label[z]
        mask = self._is_foreground(plane) if foreground else plane == 0
        flat = int(torch.nonzero(mask.flatten())[r - before])
        y, x = divmod(flat, plane.shape[1])
        return z, y, x

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._position(i)
        volume = self.volumes[i // self.samples_per_volume]
        cumulative = self._cumulative[i // self.samples_per_volume]
        rng = self._rng(i)
        shape, size = volume.shape, self.patch_size
        foreground = False
        centre = None
        if cumulative is not None:
            fg, bg = cumulative
            kinds = [(True, fg), (False, bg)]
            if rng.random() >= self.foreground_ratio:
                kinds.reverse()
            for is_fg, counts in kinds:
                if int(counts[-1]) > 0:
                    centre = self._draw(volume.label[0], counts, is_fg, rng)
                    foreground = is_fg
                    break
        if centre is None:
            start = [int(rng.integers(s - p + 1)) for s, p in zip(shape, size, strict=True)]
        else:
            start = [
                min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, size, shape, strict=True)
            ]
        window = tuple(slice(b, b + p) for b, p in zip(start, size, strict=True))
        item: dict[str, Any] = {
            "image": volume.image[(slice(None), *window)].clone(),
            "case_id": volume.case_id,
            "start": torch.tensor(start, dtype=torch.int64),
            "foreground": foreground,
            "spacing": _spacing(volume),
        }
        if self.with_label:
            item["label"] = volume.label[(slice(None), *window)].clone()
        return item
