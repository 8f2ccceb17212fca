"""Dataset formats: how a dataset lies on disk, described by data (docs/benchmarks.md).

A format names each split's image folders and the label folders paired with them, the file
suffixes, the raw label encoding that ``ssr.data.prepare`` converts from, and the class set. One
dataset class, one preparation routine and one evaluation read every format, so the official
benchmarks (GTA5, Cityscapes, SYNTHIA, ACDC, Dark Zurich) and a user's own data are all instances
of it: the built-in formats are the YAML files next to this module, a user's own is a YAML file of
the same schema passed by path (``data.source_format=my/format.yaml``).

Pairing rule (mmseg's, so every official layout fits): an image's label is its path relative to
its image folder, with ``image_suffix`` replaced by ``label_suffix``, under the paired label
folder. File lists are sorted, so indices are stable across machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ssr.data.labels import (
    CLASSES,
    NUM_CLASSES,
    PALETTE,
    SYNTHIA_EVAL_SUBSETS,
    SYNTHIA_ID_TO_TRAIN_ID,
    THING_CLASSES,
    TRAIN_ID_TO_LABEL_ID,
)
from ssr.errors import ConfigError

FORMATS_DIR = Path(__file__).with_name("format_files")
ENCODINGS = ("index", "channel16", "color")
LABEL_SIZES = ("keep", "strict")
_CHANNELS = {"R": 2, "G": 1, "B": 0}  # PNG channel -> index in OpenCV's BGR array
# id maps a format may name instead of listing: one table each, kept in ssr.data.labels.
NAMED_ID_MAPS: dict[str, dict[int, int]] = {
    "cityscapes_label_ids": {lid: t for t, lid in enumerate(TRAIN_ID_TO_LABEL_ID)},
    "synthia": SYNTHIA_ID_TO_TRAIN_ID,
}


class FormatError(ConfigError):
    """A dataset format YAML that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class ClassSet:
    """The classes a dataset is labelled with: train ids are positions in ``names``."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    thing_classes: tuple[int, ...] = ()  # the train ids FD preserves ImageNet features on

    @property
    def num_classes(self) -> int:
        return len(self.names)


CITYSCAPES_CLASSES = ClassSet(CLASSES, PALETTE, THING_CLASSES)


@dataclass(frozen=True)
class SplitDirs:
    """A split's image folders and, paired by position, its label folders (None: unlabelled)."""

    images: tuple[str, ...]
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RawLabels:
    """What ``prepare`` converts to train-id PNGs: the raw label of an image is its label path
    with ``label_suffix`` replaced by ``suffix``.

    ``index``: an 8-bit palette or grayscale PNG read by index (GTA5, Cityscapes label ids);
    ``channel16``: a 16-bit 3-channel PNG whose ``channel`` holds the id (SYNTHIA: R);
    ``color``: an RGB PNG whose colours ``color_map`` lists. Ids (or colours) outside the map
    become ignore (255); with ``void_ids`` given, only those may, and any other is an error.
    """

    suffix: str
    encoding: str
    id_map: Mapping[int, int] = field(default_factory=dict)
    channel: str = "R"
    color_map: Mapping[tuple[int, int, int], int] = field(default_factory=dict)
    void_ids: tuple[int, ...] | None = None

    @property
    def channel_index(self) -> int:
        return _CHANNELS[self.channel]


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset's on-disk description (see the module docstring for the pairing rule)."""

    name: str
    splits: Mapping[str, SplitDirs]
    image_suffix: str
    label_suffix: str
    classes: ClassSet = CITYSCAPES_CLASSES
    raw_labels: RawLabels | None = None
    rcs_split: str | None = None  # prepare writes rare-class statistics for this split
    label_size: str = "strict"  # keep: labels may differ in size from images (GTA5's quirk)
    source: str = ""  # where the description came from (a built-in name or a file path)

    def split(self, split: str) -> SplitDirs:
        if split not in self.splits:
            raise FormatError(
                f"dataset format {self.name} has no split {split!r}; it has "
                f"{', '.join(self.splits)}"
            )
        return self.splits[split]

    def label_path(self, root: Path, split: str, image: Path, suffix: str | None = None) -> Path:
        """The label (or, with ``suffix``, the raw label) of ``image`` by the pairing rule."""
        dirs = self.split(split)
        assert dirs.labels is not None
        for image_dir, label_dir in zip(dirs.images, dirs.labels, strict=True):
            try:
                relative = image.relative_to(root / image_dir)
            except ValueError:
                continue
            name = relative.name[: -len(self.image_suffix)] + (suffix or self.label_suffix)
            return root / label_dir / relative.parent / name
        raise ValueError(f"{image} lies in none of the image folders of split {split}")

    def layout(self, split: str) -> str:
        """A one-line description of a split's expected files, for error messages."""
        dirs = self.split(split)
        text = " and ".join(f"{d}/**/*{self.image_suffix}" for d in dirs.images[:2])
        if dirs.labels:
            text += f" with labels {dirs.labels[0]}/**/*{self.label_suffix}"
        return text


def load_format(name_or_path: str | Path) -> DatasetFormat:
    """A built-in format by name (gta5, cityscapes, synthia, acdc, acdc_flat, darkzurich) or a
    format YAML by path."""
    text = str(name_or_path)
    builtin = FORMATS_DIR / f"{text}.yaml"
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        if not builtin.is_file():
            raise FormatError(
                f"unknown dataset format {text!r}; built-in: {', '.join(builtin_formats())}, "
                "or pass the path of a format YAML (docs/benchmarks.md, 'Your own data')"
            )
        return _load_builtin(text)
    path = Path(text)
    if not path.is_file():
        raise FormatError(f"dataset format file {path} does not exist; pass a format YAML")
    return parse_format(_read_yaml(path), str(path))


def builtin_formats() -> list[str]:
    return sorted(p.stem for p in FORMATS_DIR.glob("*.yaml"))


@cache
def _load_builtin(name: str) -> DatasetFormat:
    return parse_format(_read_yaml(FORMATS_DIR / f"{name}.yaml"), name)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FormatError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a mapping (name, splits, image_suffix, ...)")
    return data


_KEYS = {"name", "splits", "image_suffix", "label_suffix", "classes", "raw_labels", "rcs_split",
         "label_size"}  # fmt: skip
_RAW_KEYS = {"suffix", "encoding", "id_map", "channel", "color_map", "void_ids"}


def parse_format(data: Mapping[str, Any], source: str) -> DatasetFormat:
    """Check and build a format from its YAML mapping; every mistake is one line naming the key."""

    def fail(message: str) -> FormatError:
        return FormatError(f"dataset format {source}: {message}")

    unknown = set(data) - _KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for key in ("name", "splits", "image_suffix", "label_suffix"):
        if not data.get(key):
            raise fail(f"missing key {key!r}")
    splits = {}
    if not isinstance(data["splits"], Mapping):
        raise fail("splits must map split names to {images: ..., labels: ...}")
    for split, dirs in data["splits"].items():
        if not isinstance(dirs, Mapping) or "images" not in dirs:
            raise fail(f"split {split!r} needs images: (a folder or a list of folders)")
        images = _folders(dirs["images"])
        labels = None if dirs.get("labels") is None else _folders(dirs["labels"])
        if labels is not None and len(labels) != len(images):
            raise fail(
                f"split {split!r} lists {len(images)} image folders but {len(labels)} label "
                "folders; they are paired by position"
            )
        splits[str(split)] = SplitDirs(images, labels)
    classes = _parse_classes(data.get("classes", "cityscapes"), fail)
    raw_value = data.get("raw_labels")
    label_suffix = str(data["label_suffix"])
    raw = None if raw_value is None else _parse_raw(raw_value, classes, label_suffix, fail)
    rcs_split = data.get("rcs_split")
    if rcs_split is not None and (rcs_split not in splits or splits[rcs_split].labels is None):
        raise fail(f"rcs_split {rcs_split!r} must be a split with labels")
    label_size = data.get("label_size", "strict")
    if label_size not in LABEL_SIZES:
        raise fail(f"label_size must be one of {', '.join(LABEL_SIZES)}, got {label_size!r}")
    return DatasetFormat(
        name=str(data["name"]),
        splits=splits,
        image_suffix=str(data["image_suffix"]),
        label_suffix=str(data["label_suffix"]),
        classes=classes,
        raw_labels=raw,
        rcs_split=rcs_split,
        label_size=label_size,
        source=source,
    )


def _folders(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _int(value: Any, what: str, fail: Any, low: int, high: int) -> int:
    """An integer in low..high, or a one-line error naming the key (YAML gives any type)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


def _ints(value: Any, what: str, fail: Any, low: int, high: int, size: int | None = None) -> tuple:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise fail(f"{what} must be a list of integers, got {value!r}")
    if size is not None and len(value) != size:
        raise fail(f"{what} must hold {size} integers, got {list(value)!r}")
    return tuple(_int(v, what, fail, low, high) for v in value)


def _parse_classes(value: Any, fail: Any) -> ClassSet:
    if value == "cityscapes":
        return CITYSCAPES_CLASSES
    if not isinstance(value, Mapping) or "names" not in value or "palette" not in value:
        raise fail("classes must be 'cityscapes' or {names: [...], palette: [[r, g, b], ...]}")
    if isinstance(value["names"], str) or not isinstance(value["names"], Sequence):
        raise fail("classes.names must be a list of class names")
    names = tuple(str(n) for n in value["names"])
    if not 1 <= len(names) < 255:
        raise fail(f"classes.names needs 1..254 classes (255 is ignore), got {len(names)}")
    rgbs = value["palette"]
    if isinstance(rgbs, str) or not isinstance(rgbs, Sequence) or len(rgbs) != len(names):
        raise fail(f"classes.palette needs one [r, g, b] per class ({len(names)} classes)")
    palette = tuple(_ints(rgb, "classes.palette entry", fail, 0, 255, size=3) for rgb in rgbs)
    k = len(names)
    things = _ints(value.get("thing_classes", []), "classes.thing_classes", fail, 0, k - 1)
    return ClassSet(names, palette, things)


def _parse_raw(value: Any, classes: ClassSet, label_suffix: str, fail: Any) -> RawLabels:
    if not isinstance(value, Mapping):
        raise fail("raw_labels must be a mapping (suffix, encoding, id_map, ...)")
    unknown = set(value) - _RAW_KEYS
    if unknown:
        raise fail(f"unknown raw_labels key(s) {sorted(unknown)}; allowed: {sorted(_RAW_KEYS)}")
    encoding = value.get("encoding")
    if encoding not in ENCODINGS:
        raise fail(f"raw_labels.encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    suffix = value.get("suffix")
    if not suffix or not isinstance(suffix, str):
        raise fail("raw_labels needs suffix (what the raw label file names end with)")
    if suffix.endswith(label_suffix):
        raise fail(
            f"raw_labels.suffix {suffix!r} ends with label_suffix {label_suffix!r}: prepare "
            "writes the train-id labels next to the raw ones, so the names must differ"
        )
    train_id = (0, classes.num_classes - 1)
    id_map: dict[int, int] = {}
    raw_ids = value.get("id_map") or {}
    if isinstance(raw_ids, str):
        if raw_ids not in NAMED_ID_MAPS:
            raise fail(f"raw_labels.id_map {raw_ids!r} is not one of {sorted(NAMED_ID_MAPS)}")
        raw_ids = NAMED_ID_MAPS[raw_ids]
    if not isinstance(raw_ids, Mapping):
        raise fail("raw_labels.id_map must map raw ids to train ids, e.g. {7: 0, 8: 1}")
    for raw_id, target in raw_ids.items():
        key = _int(raw_id, "a raw_labels.id_map id", fail, 0, 65535)
        id_map[key] = _train_id(target, "raw_labels.id_map", train_id, fail)
    color_map: dict[tuple[int, int, int], int] = {}
    pairs = value.get("color_map") or []
    if isinstance(pairs, Mapping | str) or not isinstance(pairs, Sequence):
        raise fail("raw_labels.color_map must be a list [[[r, g, b], train_id], ...]")
    for pair in pairs:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise fail(f"raw_labels.color_map entry {pair!r} must be [[r, g, b], train_id]")
        rgb = _ints(pair[0], "a raw_labels.color_map colour", fail, 0, 255, size=3)
        color_map[rgb] = _train_id(pair[1], "raw_labels.color_map", train_id, fail)
    if encoding == "color" and not color_map:
        raise fail("raw_labels.encoding color needs color_map: [[[r, g, b], train_id], ...]")
    if encoding != "color" and not id_map:
        raise fail(f"raw_labels.encoding {encoding} needs id_map: {{raw id: train id}} or a name")
    channel = str(value.get("channel", "R"))
    if channel not in _CHANNELS:
        raise fail(f"raw_labels.channel must be R, G or B, got {channel!r}")
    void = value.get("void_ids")
    return RawLabels(
        suffix=suffix,
        encoding=encoding,
        id_map=id_map,
        channel=channel,
        color_map=color_map,
        void_ids=None if void is None else _ints(void, "raw_labels.void_ids", fail, 0, 65535),
    )


def _train_id(value: Any, what: str, bounds: tuple[int, int], fail: Any) -> int:
    """A train id of the format's classes, or 255 (ignore)."""
    if value == 255 and not isinstance(value, bool):
        return 255
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(f"{what} maps to {value!r}, not a train id ({low}..{high} or 255)")
    return value


def check_num_classes(fmt: DatasetFormat, num_classes: int = NUM_CLASSES) -> None:
    """The model's head must have one output per class of the data it learns from."""
    if fmt.classes.num_classes != num_classes:
        raise FormatError(
            f"dataset format {fmt.source} declares {fmt.classes.num_classes} classes but the "
            f"model's head has {num_classes}; set model.decode_head.num_classes="
            f"{fmt.classes.num_classes} or map the labels to the head's classes"
        )


def resolve_eval_subsets(
    value: str | Mapping[str, Sequence[int]] | None,
) -> dict[str, tuple[int, ...]]:
    """``eval_subsets`` of a config as {name: train ids}; "synthia" names SYNTHIA's mIoU16 and
    mIoU13. The ids are checked by `ssr.metrics.SegMetric`, which knows the class count."""
    if value is None:
        return {}
    if isinstance(value, str):
        if value != "synthia":
            raise ConfigError(f"eval_subsets={value!r}: use synthia, null or {{mIoU<name>: [ids]}}")
        return dict(SYNTHIA_EVAL_SUBSETS)
    if not isinstance(value, Mapping):
        raise ConfigError(f"eval_subsets={value!r}: use synthia, null or {{mIoU<name>: [ids]}}")
    return {str(k): tuple(int(c) for c in v) for k, v in value.items()}
