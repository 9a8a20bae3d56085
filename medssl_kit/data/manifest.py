"""Data manifests: schema, loading, validation, Medical Segmentation Decathlon import (§2.2, §2.6).

A manifest is a JSON file that lists the cases of a dataset (image, optional label, split, optional
source) and says how to read them (modality, intensity window, labels). The schema is documented in
``data_manifests/README.md``; :func:`load_manifest` enforces it and :func:`validate_manifest` reads
every case and reports *all* problems it finds, each naming the case id and the file concerned.

Nothing here writes to a user's data: validation only reads, and :func:`import_msd` only reads the
task folder and writes the one new manifest file it is asked for.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl_kit.atomic import atomic_write_text
from medssl_kit.errors import ManifestError

SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")
MODALITIES: tuple[str, ...] = ("CT", "MR")
DEFAULT_IGNORE_INDEX = 255
DEFAULT_CT_WINDOW: tuple[float, float] = (-200.0, 300.0)  # HU, abdominal soft-tissue window
DEFAULT_MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)
# What a manifest can be used for, and the splits each use reads: pre-training needs a case in
# one of its splits (those ``medssl pretrain`` reads by default), fine-tuning and evaluation a
# case in each of theirs (a labelled 'train' case to train on, a 'test' case to evaluate on).
USES: tuple[str, ...] = ("pretrain", "finetune")
PRETRAIN_SPLITS: tuple[str, ...] = ("pretrain", "train")
FINETUNE_SPLITS: tuple[str, ...] = ("train", "test")
USE_NAMES: dict[str, str] = {"pretrain": "pre-training", "finetune": "fine-tuning"}
MSD_SPLIT_FRACTIONS: dict[str, float] = {"pretrain": 0.5, "train": 0.2, "val": 0.1, "test": 0.2}
MANIFEST_FILENAME = "manifest.json"

_TOP_KEYS = (
    "name",
    "description",
    "modality",
    "channels",
    "base_dir",
    "labels",
    "ignore_index",
    "intensity",
    "target_spacing",
    "sources",
    "generator",
    "cases",
)
_REQUIRED_TOP_KEYS = ("name", "modality", "labels", "cases")
_SOURCE_KEYS = ("classes", "label_map")
_CASE_KEYS = ("id", "image", "label", "split", "source")
_REQUIRED_CASE_KEYS = ("id", "image", "split")


class ManifestProblems(ManifestError):
    """Several problems found at once; ``problems`` holds one :class:`ManifestError` each.

    The message joins them with ``"; "``; the CLI prints them one per line.
    """

    def __init__(self, problems: Sequence[ManifestError]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problems: " + "; ".join(map(str, self.problems)))


def raise_problems(problems: Sequence[ManifestError]) -> None:
    """Raise nothing, the single problem, or a :class:`ManifestProblems` holding all of them."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ManifestProblems(problems)


def split_problems(error: ManifestError) -> list[ManifestError]:
    """The individual problems an error stands for (itself, unless it is a ManifestProblems)."""
    return list(error.problems) if isinstance(error, ManifestProblems) else [error]


@dataclass(frozen=True)
class Intensity:
    """How intensities are mapped to [0, 1].

    ``kind == "window"``: clip to [low, high] (Hounsfield units for CT) and scale linearly.
    ``kind == "percentiles"``: clip to the [low, high] percentiles of each volume (per channel)
    and scale.
    """

    kind: str
    low: float
    high: float

    def to_dict(self) -> dict[str, list[float]]:
        """The manifest's JSON form, e.g. ``{"window": [-200, 300]}``."""
        return {self.kind: [self.low, self.high]}


@dataclass(frozen=True)
class Case:
    """One manifest entry, with its paths resolved to absolute ones.

    ``image`` and ``label`` are the paths as written in the manifest; ``image_path`` and
    ``label_path`` are resolved against the manifest's ``base_dir``. A folder as ``image`` is read
    as a DICOM series. ``label`` is ``None`` for an unlabelled case.
    """

    id: str
    image: str
    split: str
    image_path: Path
    label: str | None = None
    label_path: Path | None = None
    source: str | None = None

    @property
    def labelled(self) -> bool:
        """Whether the case has a label file."""
        return self.label is not None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON form of this case (keys that are unset are left out)."""
        out: dict[str, Any] = {"id": self.id, "image": self.image}
        if self.label is not None:
            out["label"] = self.label
        out["split"] = self.split
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass
class Manifest:
    """A parsed, schema-checked manifest (from :func:`load_manifest` or :func:`parse_manifest`).

    ``base_dir`` is absolute; ``base_dir_raw`` is the value as written (for :meth:`to_dict`).
    ``labels`` maps class index → name (0 is background). ``target_spacing`` is (z, y, x) in mm.
    ``sources`` maps a source name to the foreground classes its cases annotate (manifest classes).
    ``label_maps`` holds, for each source whose files number their labels differently, its label
    map: label value in the files → manifest class (or 0 = background, or ``ignore_index``); the
    files of other sources, and of cases without a source, already hold manifest classes. It is
    ``None`` when no source has a map.
    """

    name: str
    modality: str
    base_dir: Path
    labels: dict[int, str]
    cases: list[Case]
    ignore_index: int = DEFAULT_IGNORE_INDEX
    intensity: Intensity = field(default_factory=lambda: Intensity("window", *DEFAULT_CT_WINDOW))
    target_spacing: tuple[float, float, float] | None = None
    sources: dict[str, list[int]] | None = None
    label_maps: dict[str, dict[int, int]] | None = None
    channels: list[str] | None = None
    generator: dict[str, Any] | None = None
    description: str | None = None
    base_dir_raw: str = "."
    path: Path | None = None

    @property
    def foreground_classes(self) -> list[int]:
        """All non-background class indices, sorted."""
        return sorted(k for k in self.labels if k != 0)

    @property
    def num_classes(self) -> int:
        """Number of output channels a segmentation head needs (largest class index + 1)."""
        return max(self.labels) + 1

    @property
    def num_channels(self) -> int:
        """Number of image channels every case must have (1 unless ``channels`` is given)."""
        return len(self.channels) if self.channels else 1

    @property
    def display_path(self) -> str:
        """The manifest file's path, or a placeholder for an in-memory manifest."""
        return str(self.path) if self.path is not None else "<manifest>"

    def split(self, name: str) -> list[Case]:
        """The cases of one split, in manifest order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; choose one of {', '.join(SPLITS)}")
        return [c for c in self.cases if c.split == name]

    def get_case(self, case_id: str) -> Case:
        """The case with this id."""
        for case in self.cases:
            if case.id == case_id:
                return case
        raise ManifestError("no such case in this manifest", case_id=case_id, path=self.path)

    def labelled_classes(self, case: Case) -> list[int]:
        """Foreground classes a case's label annotates: its source's, or all; none if unlabelled."""
        if case.label is None:
            return []
        if case.source is not None and self.sources is not None:
            return sorted(self.sources[case.source])
        return self.foreground_classes

    def label_map(self, case: Case) -> dict[int, int] | None:
        """The map from the values in a case's label file to the manifest's classes; ``None`` when
        the file already holds manifest classes (no source, or a source given as a plain list).

        File values 0 (background) and ``ignore_index`` are never in a map and stay as they are.
        :func:`medssl_kit.data.io.load_case` applies the map; validation reports any other value
        that is not a key of it.
        """
        if case.source is None or not self.label_maps:
            return None
        return self.label_maps.get(case.source)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON form (``load_manifest`` of it gives back an equal manifest)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["modality"] = self.modality
        if self.channels is not None:
            out["channels"] = list(self.channels)
        out["base_dir"] = self.base_dir_raw
        out["labels"] = {str(k): v for k, v in sorted(self.labels.items())}
        out["ignore_index"] = self.ignore_index
        out["intensity"] = self.intensity.to_dict()
        if self.target_spacing is not None:
            out["target_spacing"] = list(self.target_spacing)
        if self.sources is not None:
            maps = self.label_maps or {}
            out["sources"] = {
                name: (
                    {
                        "classes": list(classes),
                        "label_map": {str(k): v for k, v in sorted(maps[name].items())},
                    }
                    if name in maps
                    else list(classes)
                )
                for name, classes in self.sources.items()
            }
        if self.generator is not None:
            out["generator"] = self.generator
        out["cases"] = [c.to_dict() for c in self.cases]
        return out


# --------------------------------------------------------------------------------------------
# Loading and schema checks


def load_manifest(path: str | Path) -> Manifest:
    """Read and schema-check a manifest file (or the ``manifest.json`` inside a folder).

    Raises :class:`ManifestError` (or :class:`ManifestProblems`, listing every schema problem)
    naming the file, the key and, for case keys, the case id.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_FILENAME
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise ManifestError("manifest file does not exist", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read the manifest: {err}", path=path) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(
            f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", path=path
        ) from err
    return parse_manifest(data, path.parent, path=path)


def parse_manifest(
    data: Any, manifest_dir: str | Path, *, path: str | Path | None = None
) -> Manifest:
    """Schema-check a manifest given as a dict; relative ``base_dir`` resolves from manifest_dir."""
    checker = _SchemaChecker(None if path is None else Path(path))
    manifest = checker.parse(data, Path(manifest_dir))
    raise_problems(checker.problems)
    assert manifest is not None  # no problems ⇒ parse completed
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {value!r}"
    return names.get(type(value), type(value).__name__)


def _unknown_key_message(key: str, allowed: Iterable[str], what: str) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {what} '{key}'{hint}; allowed keys: {', '.join(allowed)}"


class _SchemaChecker:
    """Collects every schema problem of one manifest instead of stopping at the first."""

    def __init__(self, path: Path | None):
        self.path = path
        self.problems: list[ManifestError] = []

    def error(self, message: str, case_id: str | None = None) -> None:
        self.problems.append(ManifestError(message, case_id=case_id, path=self.path))

    def parse(self, data: Any, manifest_dir: Path) -> Manifest | None:
        if not isinstance(data, dict):
            self.error(f"the manifest must be a JSON object, got {_type_name(data)}")
            return None
        for key in data:
            if key not in _TOP_KEYS:
                self.error(_unknown_key_message(key, _TOP_KEYS, "top-level key"))
        for key in _REQUIRED_TOP_KEYS:
            if key not in data:
                self.error(f"missing required top-level key '{key}'")
            elif data[key] is None:
                self.error(f"required top-level key '{key}' must not be null")

        name = self.string(data, "name")
        description = self.string(data, "description")
        modality = self.string(data, "modality")
        if modality is not None and modality not in MODALITIES:
            self.error(f"'modality' must be one of {', '.join(MODALITIES)}, got '{modality}'")
            modality = None
        channels = self.channels(data)
        base_dir_raw = self.string(data, "base_dir")
        labels = self.labels(data)
        ignore_index = data.get("ignore_index", DEFAULT_IGNORE_INDEX)
        if not _is_int(ignore_index) or ignore_index < 0:
            self.error(
                f"'ignore_index' must be a non-negative integer, got {_type_name(ignore_index)}"
            )
            ignore_index = DEFAULT_IGNORE_INDEX
        elif labels is not None and ignore_index in labels:
            self.error(f"'ignore_index' {ignore_index} is also a class in 'labels'")
        intensity = self.intensity(data, modality)
        target_spacing = self.target_spacing(data)
        sources, label_maps = self.sources(data, labels, ignore_index)
        generator = data.get("generator")
        if generator is not None and not isinstance(generator, dict):
            self.error(f"'generator' must be an object, got {_type_name(generator)}")
        base_dir = Path(os.path.normpath(manifest_dir / os.path.expanduser(base_dir_raw or ".")))
        cases = self.cases(data, base_dir, sources)

        if self.problems:
            return None
        assert name is not None and modality is not None and labels is not None
        assert cases is not None and intensity is not None
        return Manifest(
            name=name,
            modality=modality,
            base_dir=base_dir,
            labels=labels,
            cases=cases,
            ignore_index=ignore_index,
            intensity=intensity,
            target_spacing=target_spacing,
            sources=sources,
            label_maps=label_maps or None,
            channels=channels,
            generator=generator,
            description=description,
            base_dir_raw=base_dir_raw if base_dir_raw is not None else ".",
            path=self.path,
        )

    def string(self, data: dict, key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.error(f"'{key}' must be a non-empty string, got {_type_name(value)}")
            return None
        return value

    def channels(self, data: dict) -> list[str] | None:
        value = data.get("channels")
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            self.error("'channels' must be a non-empty list of channel names (strings)")
            return None
        return list(value)

    def labels(self, data: dict) -> dict[int, str] | None:
        value = data.get("labels")
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            self.error(
                '\'labels\' must be an object like {"0": "background", "1": "liver"}, '
                f"got {_type_name(value)}"
            )
            return None
        labels: dict[int, str] = {}
        for key, name in value.items():
            if not (isinstance(key, str) and key.isdigit()):
                self.error(
                    f"'labels' key '{key}' must be a class index written as a string, e.g. \"1\""
                )
            elif not isinstance(name, str) or not name:
                self.error(f"'labels' entry '{key}' must be a class name, got {_type_name(name)}")
            else:
                labels[int(key)] = name
        if labels and 0 not in labels:
            self.error("'labels' must name class \"0\" (background)")
        return labels

    def intensity(self, data: dict, modality: str | None) -> Intensity | None:
        value = data.get("intensity")
        if value is None:
            if modality == "MR":
                return Intensity("percentiles", *DEFAULT_MR_PERCENTILES)
            return Intensity("window", *DEFAULT_CT_WINDOW)
        if not isinstance(value, dict) or len(value) != 1:
            self.error(
                '\'intensity\' must be {"window": [lo, hi]} or {"percentiles": [lo, hi]}, '
                f"got {_type_name(value) if not isinstance(value, dict) else value}"
            )
            return None
        ((kind, bounds),) = value.items()
        if kind not in ("window", "percentiles"):
            self.error(_unknown_key_message(kind, ("window", "percentiles"), "'intensity' key"))
            return None
        if not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(_is_number(b) for b in bounds)
            and bounds[0] < bounds[1]
        ):
            self.error(f"'intensity.{kind}' must be two numbers [low, high] with low < high")
            return None
        if kind == "percentiles" and not (bounds[0] >= 0 and bounds[1] <= 100):
            self.error("'intensity.percentiles' must lie within [0, 100]")
            return None
        return Intensity(kind, float(bounds[0]), float(bounds[1]))

    def target_spacing(self, data: dict) -> tuple[float, float, float] | None:
        value = data.get("target_spacing")
        if value is None:
            return None
        if not (
            isinstance(value, list)
            and len(value) == 3
            and all(_is_number(v) and v > 0 for v in value)
        ):
            self.error("'target_spacing' must be three positive numbers [z, y, x] in mm")
            return None
        return (float(value[0]), float(value[1]), float(value[2]))

    def sources(
        self, data: dict, labels: dict[int, str] | None, ignore_index: int
    ) -> tuple[dict[str, list[int]] | None, dict[str, dict[int, int]]]:
        """Parse ``sources``: each source's classes and, for the object form, its label map."""
        value = data.get("sources")
        if value is None:
            return None, {}
        if not isinstance(value, dict) or not value:
            self.error(
                f"'sources' must be an object like {{\"A\": [1, 7]}}, got {_type_name(value)}"
            )
            return None, {}
        sources: dict[str, list[int]] = {}
        label_maps: dict[str, dict[int, int]] = {}
        for name, spec in value.items():
            sources[name] = []  # known even when invalid, so its cases are not reported too
            if isinstance(spec, dict):
                parsed = self.source_object(name, spec, labels, ignore_index)
                if parsed is not None:
                    sources[name], label_maps[name] = parsed
            elif isinstance(spec, list):
                classes = self.source_classes(f"sources.{name}", spec, labels)
                if classes is not None:
                    sources[name] = classes
            else:
                self.error(
                    f"'sources.{name}' must be a list of class indices such as [1, 7], or an "
                    'object {"classes": [...], "label_map": {"<file value>": <class>, ...}}, '
                    f"got {_type_name(spec)}"
                )
        return sources, label_maps

    def source_classes(
        self, where: str, classes: Any, labels: dict[int, str] | None
    ) -> list[int] | None:
        """A source's foreground classes (sorted, distinct), or ``None`` after an error."""
        if not (isinstance(classes, list) and classes and all(_is_int(c) for c in classes)):
            self.error(f"'{where}' must be a non-empty list of class indices")
            return None
        bad = [c for c in classes if c == 0 or (labels is not None and c not in labels)]
        if bad:
            self.error(f"'{where}' lists {bad}, which are not foreground classes in 'labels'")
            return None
        return sorted(set(classes))

    def source_object(
        self, name: str, spec: dict, labels: dict[int, str] | None, ignore_index: int
    ) -> tuple[list[int], dict[int, int]] | None:
        """Parse ``{"classes": [...], "label_map": {...}}``; ``None`` after an error."""
        where = f"sources.{name}"
        before = len(self.problems)
        unknown = [key for key in spec if key not in _SOURCE_KEYS]
        for key in unknown:
            self.error(_unknown_key_message(key, _SOURCE_KEYS, f"'{where}' key"))
        for key in _SOURCE_KEYS:
            misspelt = any(difflib.get_close_matches(u, [key], n=1) for u in unknown)
            if key not in spec and not misspelt:  # a typo is reported once, with its hint
                self.error(
                    f"'{where}' lacks the key '{key}'; a source given as an object needs both "
                    "'classes' and 'label_map' (a plain list of classes means no label map)"
                )
        classes = (
            self.source_classes(f"{where}.classes", spec["classes"], labels)
            if "classes" in spec
            else None
        )
        label_map = (
            self.source_label_map(where, spec["label_map"], labels, ignore_index)
            if "label_map" in spec
            else None
        )
        if len(self.problems) > before or classes is None or label_map is None:
            return None
        reached = sorted({v for v in label_map.values() if v not in (0, ignore_index)})
        if reached != classes:
            self.error(
                f"'{where}.classes' {classes} differs from the foreground classes its "
                f"'label_map' maps to {reached}; list exactly the classes the map produces"
            )
            return None
        return classes, label_map

    def source_label_map(
        self, where: str, value: Any, labels: dict[int, str] | None, ignore_index: int
    ) -> dict[int, int] | None:
        """A source's ``label_map`` as {file value: manifest class}, or ``None`` after an error."""
        if not isinstance(value, dict) or not value:
            self.error(
                f"'{where}.label_map' must be a non-empty object like {{\"1\": 3}} (label value "
                f"in the source's files -> class in 'labels'), got {_type_name(value)}"
            )
            return None
        known = "" if labels is None else f" ({', '.join(str(k) for k in sorted(labels))})"
        label_map: dict[int, int] = {}
        before = len(self.problems)
        for key, target in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                self.error(
                    f"'{where}.label_map' key '{key}' must be a label value of the source's "
                    'files: a non-negative integer written as a string, e.g. "1"'
                )
            elif int(key) in label_map:
                self.error(f"'{where}.label_map' lists the file value {int(key)} twice")
            elif int(key) == ignore_index:
                self.error(
                    f"'{where}.label_map' maps ignore_index {ignore_index}, which always stays "
                    "ignore_index; remove that entry"
                )
            elif not _is_int(target):
                self.error(
                    f"'{where}.label_map' entry '{key}' must map to a class index (an integer), "
                    f"got {_type_name(target)}"
                )
            elif target != ignore_index and labels is not None and target not in labels:
                self.error(
                    f"'{where}.label_map' maps file value {key} to {target}, which is neither "
                    f"a class in 'labels'{known} nor ignore_index {ignore_index}"
                )
            elif int(key) == 0 and target != 0:
                self.error(
                    f"'{where}.label_map' maps file value 0 to {target}; 0 is background in "
                    "every file and always stays 0"
                )
            else:
                label_map[int(key)] = target
        return label_map if len(self.problems) == before else None

    def cases(
        self, data: dict, base_dir: Path, sources: dict[str, list[int]] | None
    ) -> list[Case] | None:
        value = data.get("cases")
        if value is None:
            return None
        if not isinstance(value, list):
            self.error(f"'cases' must be a list, got {_type_name(value)}")
            return None
        cases: list[Case] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(value):
            case = self.case(i, entry, base_dir, sources)
            if case is None:
                continue
            if case.id in seen:
                self.error(
                    f"duplicate case id (entries {seen[case.id]} and {i} of 'cases'); "
                    "case ids must be unique",
                    case_id=case.id,
                )
                continue
            seen[case.id] = i
            cases.append(case)
        return cases

    def case(
        self, index: int, entry: Any, base_dir: Path, sources: dict[str, list[int]] | None
    ) -> Case | None:
        if not isinstance(entry, dict):
            self.error(f"'cases[{index}]' must be an object, got {_type_name(entry)}")
            return None
        raw_id = entry.get("id")
        case_id = raw_id if isinstance(raw_id, str) and raw_id else None
        who = case_id if case_id is not None else f"cases[{index}]"
        before = len(self.problems)
        for key in entry:
            if key not in _CASE_KEYS:
                self.error(_unknown_key_message(key, _CASE_KEYS, "case key"), case_id=who)
        for key in _REQUIRED_CASE_KEYS:
            if key not in entry:
                self.error(f"missing required case key '{key}'", case_id=who)
        for key in ("id", "image", "split"):
            if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
                self.error(
                    f"case key '{key}' must be a non-empty string, got {_type_name(entry[key])}",
                    case_id=who,
                )
        label = entry.get("label")
        if label is not None and not (isinstance(label, str) and label.strip()):
            self.error(
                f"case key 'label' must be a path string or null, got {_type_name(label)}",
                case_id=who,
            )
        split = entry.get("split")
        if isinstance(split, str) and split.strip() and split not in SPLITS:
            self.error(f"'split' must be one of {', '.join(SPLITS)}, got '{split}'", case_id=who)
        elif split in SPLITS and split != "pretrain" and label is None:
            self.error(
                f"split '{split}' needs a label; unlabelled cases belong to 'pretrain'",
                case_id=who,
            )
        source = entry.get("source")
        if source is not None:
            if not isinstance(source, str):
                self.error(
                    f"case key 'source' must be a string, got {_type_name(source)}", case_id=who
                )
            elif sources is None:
                self.error(
                    f"case has source '{source}' but the manifest has no top-level 'sources'",
                    case_id=who,
                )
            elif source not in sources:
                self.error(
                    f"source '{source}' is not one of the manifest's sources "
                    f"({', '.join(sources)})",
                    case_id=who,
                )
        if len(self.problems) > before:
            return None
        return Case(
            id=entry["id"],
            image=entry["image"],
            split=split,
            image_path=Path(os.path.normpath(base_dir / os.path.expanduser(entry["image"]))),
            label=label,
            label_path=(
                None
                if label is None
                else Path(os.path.normpath(base_dir / os.path.expanduser(label)))
            ),
            source=source,
        )


# --------------------------------------------------------------------------------------------
# Validation


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
    from medssl_kit.data import io  # imported here: reading pulls in MONAI, schema checks do not

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


# --------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon import


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ManifestError(
            "exists already; choose another output path or pass overwrite=True (--overwrite)",
            path=path,
        )


def _write_json_new(path: Path, data: Any, overwrite: bool) -> None:
    """Write JSON atomically; refuse to replace an existing file unless ``overwrite``."""
    _refuse_existing(path, overwrite)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _msd_rel(entry: Any, task_dir: Path, what: str) -> str:
    """Normalise an MSD path ("./imagesTr/x.nii.gz") to a task-relative POSIX path."""
    if not isinstance(entry, str) or not entry:
        raise ManifestError(
            f"dataset.json: {what} must be a path string, got {entry!r}", path=task_dir
        )
    return Path(os.path.normpath(entry)).as_posix()


def _case_id(rel: str) -> str:
    name = Path(rel).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Case counts per split: each non-pretrain split gets round(f·n), at least 1 if f > 0."""
    counts = {
        s: (max(1, round(fractions.get(s, 0.0) * n)) if fractions.get(s, 0.0) > 0 else 0)
        for s in ("test", "val", "train")
    }
    counts["pretrain"] = n - sum(counts.values())
    if counts["pretrain"] < 0:
        raise ManifestError(
            f"{n} labelled training cases are too few for the split fractions {dict(fractions)}; "
            "each of train/val/test with a non-zero fraction needs at least one case"
        )
    return counts


def import_msd(
    task_dir: str | Path,
    out_manifest: str | Path,
    seed: int = 0,
    fractions: Mapping[str, float] = MSD_SPLIT_FRACTIONS,
    window: tuple[float, float] = DEFAULT_CT_WINDOW,
    overwrite: bool = False,
) -> Path:
    """Write a manifest for a Medical Segmentation Decathlon task folder; return its path.

    The task folder holds ``dataset.json`` (name, modality, labels, training [{image, label}],
    test [paths]) and imagesTr / labelsTr / imagesTs; it is only read. Labelled training cases are
    shuffled with ``seed`` and split by ``fractions`` (default 50 % pretrain, 20 % train, 10 % val,
    20 % test; train/val/test get at least one case each, pretrain the remainder); imagesTs cases
    become unlabelled "pretrain" cases. CT tasks get an intensity window (``window``, HU), MR
    tasks 0.5–99.5 percentile scaling; multi-modal tasks (4D images) record their channel names.
    ``base_dir`` points at the task folder, relative to the manifest when possible. An existing
    ``out_manifest`` is never replaced unless ``overwrite``.
    """
    task_dir = Path(os.path.abspath(Path(task_dir).expanduser()))
    out_manifest = Path(os.path.abspath(Path(out_manifest).expanduser()))
    dataset_json = task_dir / "dataset.json"
    if not dataset_json.is_file():
        raise ManifestError(
            "no dataset.json here; is this a Medical Segmentation Decathlon task folder?",
            path=task_dir,
        )
    if out_manifest.is_relative_to(task_dir):
        raise ManifestError(
            "the manifest would be written inside the task folder, which import-msd never "
            "modifies; choose an output path outside it",
            path=out_manifest,
        )
    if set(fractions) - set(SPLITS) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"fractions must map splits {SPLITS} to shares that sum to 1, got {fractions}"
        )
    _refuse_existing(out_manifest, overwrite)
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ManifestError(
            f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", path=dataset_json
        ) from err
    if not isinstance(meta, dict):
        raise ManifestError("dataset.json must hold a JSON object", path=dataset_json)
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise ManifestError(f"dataset.json lacks the key '{key}'", path=dataset_json)

    modality_map = meta["modality"]
    if not isinstance(modality_map, dict) or not modality_map:
        raise ManifestError("dataset.json 'modality' must be an object", path=dataset_json)
    channel_names = [str(modality_map[k]) for k in sorted(modality_map, key=lambda k: int(k))]
    is_ct = [name.upper() == "CT" for name in channel_names]
    if any(is_ct) and not all(is_ct):
        raise ManifestError(
            f"mixes CT with other channels ({', '.join(channel_names)}), which one intensity "
            "rule cannot handle",
            path=dataset_json,
        )
    modality = "CT" if all(is_ct) else "MR"

    raw_labels = meta["labels"]
    if isinstance(raw_labels, dict) and raw_labels and all(_is_int(v) for v in raw_labels.values()):
        raw_labels = {str(v): k for k, v in raw_labels.items()}  # nnU-Net v2 style {name: index}
    if not isinstance(raw_labels, dict) or not all(str(k).isdigit() for k in raw_labels):
        raise ManifestError(
            "dataset.json 'labels' must map class indices to names", path=dataset_json
        )
    labels = {str(int(k)): str(v) for k, v in sorted(raw_labels.items(), key=lambda kv: int(kv[0]))}

    training = []
    for i, item in enumerate(meta["training"]):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ManifestError(
                f"dataset.json 'training[{i}]' must be an object with 'image' and 'label'",
                path=dataset_json,
            )
        image = _msd_rel(item["image"], task_dir, f"training[{i}].image")
        training.append((_case_id(image), image, _msd_rel(item["label"], task_dir, "label")))
    tests = [_msd_rel(p, task_dir, "test entry") for p in meta.get("test", [])]

    missing = [
        rel
        for _, image, label in training
        for rel in (image, label)
        if not (task_dir / rel).exists()
    ] + [rel for rel in tests if not (task_dir / rel).exists()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ManifestError(
            f"dataset.json lists files that do not exist: {', '.join(missing[:3])}{more}",
            path=task_dir,
        )
    if len({cid for cid, _, _ in training}) != len(training):
        raise ManifestError("dataset.json lists a training image twice", path=dataset_json)

    training.sort()
    counts = _split_counts(len(training), fractions)
    order = np.random.default_rng(seed).permutation(len(training))
    split_of: dict[str, str] = {}
    start = 0
    for split in ("test", "val", "train", "pretrain"):
        for idx in order[start : start + counts[split]]:
            split_of[training[idx][0]] = split
        start += counts[split]

    cases: list[dict[str, Any]] = [
        {"id": cid, "image": image, "label": label, "split": split_of[cid]}
        for cid, image, label in training
    ]
    taken = {c["id"] for c in cases}
    for rel in sorted(tests):
        cid = _case_id(rel)
        if cid in taken:
            cid = f"ts_{cid}"
        taken.add(cid)
        cases.append({"id": cid, "image": rel, "split": "pretrain"})

    try:
        base_dir = Path(os.path.relpath(task_dir, out_manifest.parent)).as_posix()
    except ValueError:  # different drives on Windows
        base_dir = task_dir.as_posix()
    intensity = (
        {"window": [float(window[0]), float(window[1])]}
        if modality == "CT"
        else {"percentiles": list(DEFAULT_MR_PERCENTILES)}
    )
    manifest: dict[str, Any] = {"name": str(meta.get("name") or task_dir.name)}
    if meta.get("description"):
        manifest["description"] = str(meta["description"])
    manifest["modality"] = modality
    if len(channel_names) > 1:
        manifest["channels"] = channel_names
    manifest.update(
        {
            "base_dir": base_dir,
            "labels": labels,
            "ignore_index": DEFAULT_IGNORE_INDEX,
            "intensity": intensity,
            "generator": {
                "tool": "medssl import-msd",
                "task_dir": task_dir.as_posix(),
                "seed": seed,
                "fractions": dict(fractions),
            },
            "cases": cases,
        }
    )
    parse_manifest(manifest, out_manifest.parent, path=out_manifest)  # never write an invalid one
    _write_json_new(out_manifest, manifest, overwrite)
    return out_manifest
