"""Data manifests: the schema and its loading (§2.2).

A manifest is a JSON file that lists the cases of a dataset (image, optional label, split, optional
source) and says how to read them (modality, intensity window, labels). The schema is documented in
``data_manifests/README.md``; :func:`load_manifest` enforces it without opening any case file.
Reading the cases is :mod:`medssl_kit.data.io`; checking every case against the schema,
:func:`medssl_kit.data.validate.validate_manifest` (§2.6); writing a manifest for a Medical
Segmentation Decathlon task, :func:`medssl_kit.data.msd.import_msd`. Nothing here writes anything.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
