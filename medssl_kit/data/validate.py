"""Validating a manifest's cases: reads every file and reports *all* problems (§2.6).

:func:`validate_manifest` reads every case of a :class:`~medssl_kit.data.manifest.Manifest`
(through :mod:`medssl_kit.data.io`) and reports each problem with the case id and the file
concerned, what the manifest's splits can be used for, and a summary table. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medssl_kit.data import io
from medssl_kit.data.manifest import (
    FINETUNE_SPLITS,
    PRETRAIN_SPLITS,
    SPLITS,
    USES,
    Manifest,
    raise_problems,
    split_problems,
)
from medssl_kit.errors import ManifestError


@dataclass
class CaseInfo:
    """What validation learnt about one case (``None`` where it could not be read).

    ``shape`` is (z, y, x) voxels as stored, ``spacing`` (z, y, x) in mm; ``resampled_shape`` is
    the shape after resampling to the manifest's ``target_spacing`` (``shape`` when it has none).
    ``label_counts`` maps label value → voxel count, in the manifest's label space (a mapped
    source's file values are counted as the classes they map to).
    """

    case_id: str
    split: str
    source: str | None
    image: str
    labelled: bool = False
    shape: tuple[int, int, int] | None = None
    resampled_shape: tuple[int, int, int] | None = None
    channels: int | None = None
    spacing: tuple[float, float, float] | None = None
    label_counts: dict[int, int] | None = None
    ok: bool = True


@dataclass
class ValidationReport:
    """All problems found in a manifest (one :class:`ManifestError` each) and per-case facts.

    ``uses`` are what the manifest's splits are sound for (a subset of :data:`USES`, in order:
    fine-tuning needs the splits pre-training needs and more); ``notes`` are remarks that are not
    problems, e.g. the splits fine-tuning would need when only pre-training was asked for.
    """

    manifest: Manifest
    problems: list[ManifestError] = field(default_factory=list)
    cases: list[CaseInfo] = field(default_factory=list)
    uses: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def use(self) -> str:
        """What the manifest can be used for, in words: "pre-training and fine-tuning",
        "pre-training only" or "nothing yet" (no case in a split pre-training reads)."""
        if "finetune" in self.uses:
            return "pre-training and fine-tuning"
        return "pre-training only" if "pretrain" in self.uses else "nothing yet"

    def raise_if_failed(self) -> None:
        """Raise the problem found, or a :class:`ManifestProblems` listing all of them."""
        raise_problems(self.problems)

    def summary_table(self) -> str:
        """A fixed-width text table: cases, shapes and spacings per split, voxels per label, the
        use the manifest is sound for and any notes."""
        return _summary_table(self)


def _quoted(splits: Sequence[str], joiner: str = "and") -> str:
    names = [f"'{s}'" for s in splits]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {joiner} {names[-1]}"


def _check_uses(
    manifest: Manifest, use: str | None, splits_required: Sequence[str]
) -> tuple[tuple[str, ...], list[ManifestError], list[str]]:
    """The uses the splits allow, the problems (what ``use`` and ``splits_required`` demand but
    the splits lack) and the notes (what fine-tuning would need when it was not demanded)."""
    where = manifest.display_path
    empty = [s for s in SPLITS if not manifest.split(s)]
    pretrain = any(s not in empty for s in PRETRAIN_SPLITS)
    lacking = [s for s in FINETUNE_SPLITS if s in empty]
    uses = (("pretrain",) if pretrain else ()) + (("finetune",) if pretrain and not lacking else ())
    problems, notes = [], []
    if not pretrain:
        problems.append(
            ManifestError(
                f"no case in split {_quoted(PRETRAIN_SPLITS, 'or')}: pre-training reads those "
                "splits, so the manifest can be used for nothing yet",
                path=where,
            )
        )
    if lacking:
        what = (
            f"split{'s' if len(lacking) > 1 else ''} {_quoted(lacking)} "
            f"{'have' if len(lacking) > 1 else 'has'} no cases"
        )
        need = "fine-tuning trains on labelled 'train' cases and evaluates on 'test' cases"
        if use == "finetune":
            can = "pre-training only" if pretrain else "nothing yet"
            problems.append(
                ManifestError(f"{what}; {need}, so the manifest can be used for {can}", path=where)
            )
        elif pretrain:
            notes.append(f"no fine-tuning: {what} ({need})")
    elif "val" in empty:
        notes.append("split 'val' has no cases: fine-tuning selects its model on the train cases")
    for split in splits_required:
        if split in empty and not (use == "finetune" and split in lacking):
            problems.append(
                ManifestError(
                    f"split '{split}' has no cases (required splits: {', '.join(splits_required)})",
                    path=where,
                )
            )
    return uses, problems, notes


def validate_manifest(
    manifest: Manifest,
    patch_size: Sequence[int] | None = None,
    use: str | None = None,
    splits_required: Sequence[str] = (),
) -> ValidationReport:
    """Read every case and check it (§2.6); collect every problem rather than stop at the first.

    Checks: image / label file exists and is readable (NIfTI, DICOM series); image and label
    agree in shape and affine; image intensities are finite; label values are integers listed in
    ``labels`` (or ``ignore_index``), or, for a source with a ``label_map``, keys of that map (or 0
    or ``ignore_index``); labels of a source's case only use that source's classes;
    every volume (after resampling to ``target_spacing``) is at least ``patch_size`` (z, y, x).

    And what the manifest can be used for (``report.uses``, in words ``report.use``): pre-training
    needs a case in split "pretrain" or "train", fine-tuning and evaluation a case in "train" and
    in "test". ``use`` is the use it must be sound for: ``None`` or ``"pretrain"`` (the splits
    fine-tuning would need are then a note when missing, not a problem), or ``"finetune"``
    (missing "train" / "test" cases are problems). ``splits_required`` names further splits that
    must have a case. Schema problems and duplicate ids are caught earlier, by
    :func:`load_manifest`. Nothing is written.
    """
    if use is not None and use not in USES:
        raise ValueError(f"unknown use {use!r}; choose from {', '.join(USES)} (or None)")
    unknown = [s for s in splits_required if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    if patch_size is not None and (
        len(patch_size) != 3
        or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in patch_size)
        or min(patch_size) < 1
    ):
        raise ValueError(f"patch_size must be three positive integers (z, y, x), got {patch_size}")
    report = ValidationReport(manifest=manifest)
    report.uses, report.problems, report.notes = _check_uses(manifest, use, splits_required)
    for case in manifest.cases:
        info = CaseInfo(case.id, case.split, case.source, case.image, case.label is not None)
        report.cases.append(info)
        try:
            raw = io.read_raw(case, manifest)
        except ManifestError as err:
            report.problems.extend(split_problems(err))
            info.ok = False
            continue
        checked = io.check_raw(raw, case, manifest)
        info.shape = raw.shape
        info.channels = int(raw.image.shape[0])
        info.spacing = raw.spacing
        info.resampled_shape = (
            io.resampled_shape(raw.shape, raw.spacing, manifest.target_spacing)
            if manifest.target_spacing is not None
            else raw.shape
        )
        info.label_counts = checked.label_counts
        problems = list(checked.problems)
        if patch_size is not None:
            small = ["zyx"[i] for i in range(3) if info.resampled_shape[i] < int(patch_size[i])]
            if small:
                resampled = " after resampling" if manifest.target_spacing is not None else ""
                problems.append(
                    ManifestError(
                        f"volume of {_fmt_shape(info.resampled_shape)} voxels (z, y, x){resampled} "
                        f"is smaller than the patch size {_fmt_shape(patch_size)} along "
                        f"{', '.join(small)}; use a smaller patch size or drop the case",
                        case_id=case.id,
                        path=case.image_path,
                    )
                )
        report.problems.extend(problems)
        info.ok = not problems
    return report


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _fmt_range(values: Sequence[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def _shape_range(shapes: Sequence[tuple[int, int, int]]) -> str:
    return "x".join(_fmt_range([s[i] for s in shapes], "d") for i in range(3))


def _spacing_range(spacings: Sequence[tuple[float, float, float]]) -> str:
    return " / ".join(_fmt_range([s[i] for s in spacings], ".2f") for i in range(3))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Fixed-width rows; ``align`` has one 'l' or 'r' per column."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if a == "l" else str(c).rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _summary_table(report: ValidationReport) -> str:
    manifest = report.manifest
    lines = [
        f"manifest  {manifest.display_path}",
        f"name      {manifest.name} ({manifest.modality}, {len(manifest.cases)} cases, "
        f"{manifest.num_channels} channel{'s' if manifest.num_channels != 1 else ''})",
        f"base_dir  {manifest.base_dir}",
    ]
    if manifest.target_spacing is not None:
        lines.append(f"resample  to {' / '.join(f'{s:.2f}' for s in manifest.target_spacing)} mm")
    lines.append("")
    splits = [s for s in SPLITS if manifest.split(s)]
    resampled = manifest.target_spacing is not None

    def split_row(name: str, infos: list[CaseInfo]) -> list[str]:
        read = [i for i in infos if i.shape is not None]
        row = [
            name,
            str(len(infos)),
            str(sum(1 for i in infos if i.labelled)),
            str(sum(1 for i in infos if not i.ok)),
            _shape_range([i.shape for i in read]) if read else "-",
            _spacing_range([i.spacing for i in read]) if read else "-",
        ]
        if resampled:
            row.append(_shape_range([i.resampled_shape for i in read]) if read else "-")
        return row

    rows = [split_row(s, [i for i in report.cases if i.split == s]) for s in splits]
    rows.append(split_row("all", report.cases))
    header = ["split", "cases", "labelled", "failed", "shape (z,y,x)", "spacing z / y / x (mm)"]
    if resampled:
        header.append("resampled shape")
    lines += _table(header, rows, "lrrrll" + "l" * resampled)

    values = sorted(
        {v for i in report.cases if i.label_counts for v in i.label_counts} | set(manifest.labels)
    )
    lines += ["", "voxels per label"]
    count_rows = []
    for value in values:
        name = manifest.labels.get(value)
        if name is None:
            name = "ignore" if value == manifest.ignore_index else "(not in labels)"
        per_split = [
            sum(
                i.label_counts.get(value, 0)
                for i in report.cases
                if i.split == split and i.label_counts
            )
            for split in splits
        ]
        count_rows.append([str(value), name, *(f"{n:,}" for n in per_split), f"{sum(per_split):,}"])
    lines += _table(
        ["value", "label", *splits, "total"], count_rows, "rl" + "r" * (len(splits) + 1)
    )
    if manifest.sources:
        lines += ["", "sources"]
        maps = manifest.label_maps or {}
        src_rows = []
        for name, classes in manifest.sources.items():
            row = [
                name,
                ", ".join(manifest.labels[c] for c in classes),
                str(sum(1 for c in manifest.cases if c.source == name)),
            ]
            if maps:  # file value -> manifest class; "-": the files hold manifest classes
                row.append(
                    ", ".join(f"{k}->{v}" for k, v in sorted(maps[name].items()))
                    if name in maps
                    else "-"
                )
            src_rows.append(row)
        header = ["source", "annotates", "cases", *(["label map (file -> class)"] if maps else [])]
        lines += _table(header, src_rows, "llrl"[: len(header)])
    lines.append("")
    lines.append(f"use       {report.use}")
    lines += [f"note      {note}" for note in report.notes]
    lines.append("")
    lines.append(
        "OK: no problems found"
        if report.ok
        else f"FAILED: {len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}"
    )
    return "\n".join(lines)
