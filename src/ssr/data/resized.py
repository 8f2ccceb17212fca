"""Pre-resized copies of a dataset: ``python -m ssr.data.prepare FORMAT ROOT --resized OUT
--scale LONG SHORT`` (docs/benchmarks.md, "Pre-resized copies").

The training pipeline's first step is a keep-ratio resize (docs/method.md §4.1). Done once here,
it spares every training step the decoding of full-size PNGs and the resize, so a fast GPU never
waits for the loader. The copy gives exactly the pixels of resizing on the fly: each image
(bilinear) and each train-id label (nearest) is resized from its own size by the pipeline's own
`keep_ratio_resize`, saved losslessly, and the pipeline's resize of a resized file is the identity
(`rescale_size` is idempotent). Only the chosen splits (default: train) are resized; the others —
validation, scored at full resolution — are symbolic links to the originals, and so are the
rare-class statistics (counted at full resolution, as in the reference). ``resized.json`` records
the scale; the datamodule refuses a copy whose scale is not its resize.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import cv2

from ssr.data.files import read_image, read_label
from ssr.data.formats import DatasetFormat
from ssr.data.scaling import keep_ratio_resize
from ssr.errors import ConfigError, UserError
from ssr.io import atomic_write_json, atomic_write_png, find_files

MARKER = "resized.json"
STATS_FILES = ("sample_class_stats.json", "sample_class_stats_dict.json", "samples_with_class.json")


class ResizedCopyError(UserError, RuntimeError):
    """A copy that cannot be made (where, what, which scale); one line, exit 2."""


class ResizeJob(NamedTuple):
    """One file to resize: ``label`` ones are train ids (nearest), the others images (bilinear)."""

    src: str
    dst: str
    label: bool
    scale: tuple[int, int]
    num_classes: int


def resize_file(job: ResizeJob) -> str:
    """Write ``job.dst``, the resized ``job.src``; returns ``dst`` (a pool worker's job)."""
    if job.label:
        label = read_label(Path(job.src), job.num_classes)
        array = keep_ratio_resize(label, job.scale, cv2.INTER_NEAREST)
    else:
        array = keep_ratio_resize(read_image(Path(job.src)), job.scale, cv2.INTER_LINEAR)
    atomic_write_png(job.dst, array)
    return job.dst


def check_copy(fmt: DatasetFormat, root: Path, out: Path, splits: Sequence[str]) -> None:
    """What can be refused before any preparation: the image type, OUT, the split names."""
    if not fmt.image_suffix.lower().endswith(".png"):
        raise ResizedCopyError(
            f"--resized writes lossless PNG copies, but {fmt.name}'s images are "
            f"*{fmt.image_suffix}; train from the original images"
        )
    if out.resolve().is_relative_to(root.resolve()):  # the root itself too
        raise ResizedCopyError(f"--resized {out} must lie outside the dataset root {root}")
    if out.exists() and not out.is_dir():
        raise ResizedCopyError(f"--resized {out} is a file; name a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ResizedCopyError(
            f"--resized {out} is not empty and holds no {MARKER}; use a new folder"
        )
    unknown = [s for s in splits if s not in fmt.splits]
    if unknown:
        raise ResizedCopyError(
            f"--splits {unknown[0]} is not a split of {fmt.name} ({', '.join(fmt.splits)})"
        )


def copy_jobs(
    fmt: DatasetFormat, root: Path, out: Path, scale: tuple[int, int], splits: Sequence[str]
) -> tuple[list[ResizeJob], list[tuple[Path, Path]]]:
    """The files to resize (images and labels of ``splits``) and the (original, link) pairs of
    every other split's folders and of the statistics (after `check_copy`). Writes nothing."""
    jobs, links, k = [], [], fmt.classes.num_classes
    for split, dirs in fmt.splits.items():
        folders = list(dirs.images) + list(dirs.labels or ())
        if split not in splits:
            links += [(root / f, out / f) for f in folders if (root / f).is_dir()]
            continue
        for folder in dirs.images:
            if not (root / folder).is_dir():
                raise ResizedCopyError(f"{root / folder} does not exist; nothing to resize")
            for image in find_files(root / folder, f"*{fmt.image_suffix}"):
                dst = out / image.relative_to(root)
                jobs.append(ResizeJob(str(image), str(dst), False, scale, k))
                if dirs.labels is not None:
                    label = fmt.label_path(root, split, image)
                    if label.is_file():  # a labelled split: its train ids, never the raw labels
                        dst = out / label.relative_to(root)
                        jobs.append(ResizeJob(str(label), str(dst), True, scale, k))
    links += [(root / name, out / name) for name in STATS_FILES if (root / name).is_file()]
    return jobs, links


def link(target: Path, path: Path) -> None:
    """``path``, a symbolic link to the original ``target`` (absolute, so the copy can move); an
    existing one stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.is_symlink() or path.exists()):
        os.symlink(target.resolve(), path)


def write_marker(out: Path, fmt: DatasetFormat, root: Path, scale: tuple[int, int],
                 splits: Sequence[str], complete: bool) -> None:  # fmt: skip
    """Written first (complete=false) and last (complete=true): an interrupted copy is refused."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": fmt.source, "from": str(root.resolve()), "scale": list(scale)}
    atomic_write_json(out / MARKER, record | {"splits": list(splits), "complete": complete})


def check_resized(root: str | Path, resize: tuple[int, int], key: str) -> None:
    """A pre-resized copy gives the on-the-fly pixels only at its own scale: refuse another one
    (``key`` is the data config's resize setting, named in the message)."""
    path = Path(root) / MARKER
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    if not record.get("complete"):
        raise ConfigError(
            f"{root} is an unfinished pre-resized copy (interrupted); re-run its prepare --resized"
        )
    if tuple(record["scale"]) != tuple(resize):
        raise ConfigError(
            f"{root} was pre-resized to {record['scale']} but {key} is {list(resize)}: the pixels "
            f"would differ from resizing the original; set {key}={record['scale']} or use "
            f"{record['from']}"
        )
