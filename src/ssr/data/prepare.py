"""Label preparation CLI: raw labels -> train-id PNGs, checks, and rare-class statistics.

    python -m ssr.data.prepare FORMAT ROOT [--nproc N] [--num-classes 19]

FORMAT is a built-in dataset format (gta5, cityscapes, synthia, acdc, acdc_flat, darkzurich) or
the path of a format YAML (``ssr.data.formats``; docs/benchmarks.md). For every labelled split
whose label folder exists, each raw label (GTA5: palette PNGs of Cityscapes label ids, decoded by
index, never by colour, docs/method.md §7.2; Cityscapes: ``*_gtFine_labelIds.png``, §7.4; SYNTHIA:
16-bit PNGs, class id in the R channel) becomes a train-id PNG next to it; formats whose labels
already are train ids (ACDC, Dark Zurich) are checked. Every image must have a label, label values
must be train ids of the format's classes, pairs must have one size (unless the format keeps
GTA5's mismatches), and the classes must match the model's head (``--num-classes``). For the
format's ``rcs_split`` the per-file class pixel counts at full resolution go to
``sample_class_stats.json``, ``sample_class_stats_dict.json`` and ``samples_with_class.json`` in
ROOT (§4.2). Deviation: for Cityscapes the reference rasterises the polygon JSONs instead; mapping
the shipped labelIds gives the same classes up to rasterisation differences.

Re-running is safe: finished outputs are kept (only read back for the statistics) and every file
is written to a temporary name first and moved into place (``ssr.io.atomic_write``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.progress import track

from ssr.data.files import image_size, non_train_id, read_label
from ssr.data.formats import DatasetFormat, RawLabels, check_num_classes, load_format
from ssr.data.labels import IGNORE_INDEX, NUM_CLASSES
from ssr.data.raw_labels import decode
from ssr.data.resized import check_copy, copy_jobs, link, resize_file, write_marker
from ssr.errors import UserError
from ssr.io import atomic_write_json, atomic_write_png, find_files, remove_stale_temps_in
from ssr.run.cli import cli

START_METHOD = "forkserver" if "forkserver" in get_all_start_methods() else "spawn"


class PrepareError(UserError, RuntimeError):
    """An input that cannot be converted; the message names the file and the fix."""


class Converted(NamedTuple):
    """One label file's outcome: its train ids, and what the conversion had to say about it."""

    train_ids: np.ndarray
    rewritten: bool  # an existing output was unusable and has been written anew
    all_ignore: bool  # every pixel maps to ignore: label ids of another dataset? colours?


def convert_label(
    src: Path, dst: Path, raw: RawLabels, num_classes: int = NUM_CLASSES
) -> Converted:
    """Write ``dst`` (uint8 train ids) from raw label ``src`` unless a sound one exists.

    An existing ``dst`` is kept only if it is an 8-bit single-channel PNG of ``src``'s size holding
    train ids: leftovers of an interrupted or foreign conversion are rewritten, so re-running
    prepare repairs a dataset (and its RCS statistics).
    """
    existed = dst.is_file()
    existing = _sound_output(src, dst, num_classes) if existed else None
    if existing is not None:
        return Converted(existing, False, not (existing != IGNORE_INDEX).any())
    train_ids = decode(src, raw)
    atomic_write_png(dst, train_ids.astype(np.uint8, copy=False))  # never half a label
    return Converted(train_ids, existed, not (train_ids != IGNORE_INDEX).any())


def _sound_output(src: Path, dst: Path, num_classes: int) -> np.ndarray | None:
    """``dst``'s train ids if it is a valid conversion of ``src``, else None."""
    try:
        with Image.open(dst) as out, Image.open(src) as raw:
            if out.mode != "L" or out.size != raw.size:
                return None
            train_ids = np.asarray(out)
    except (OSError, UnidentifiedImageError, SyntaxError):
        return None
    return None if non_train_id(train_ids, num_classes) is not None else train_ids


def class_counts(train_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[int, int]:
    """Pixel count of every train id present (ignore pixels and absent classes omitted)."""
    counts = np.bincount(train_ids.ravel(), minlength=256)[:num_classes]
    return {c: int(n) for c, n in enumerate(counts) if n > 0}


class Job(NamedTuple):
    """One label file: convert ``src`` (raw) to ``dst``, or, without ``raw``, check ``dst``."""

    src: str | None
    dst: str
    raw: RawLabels | None
    num_classes: int


def _job(job: Job) -> tuple[str, dict[int, int], bool, bool, tuple[int, int]]:
    """(output, class counts, rewritten, all ignore, (H, W)) of one label file."""
    if job.raw is None or job.src is None:
        train_ids = read_label(Path(job.dst), job.num_classes)
        done = Converted(train_ids, False, not (train_ids != IGNORE_INDEX).any())
    else:
        done = convert_label(Path(job.src), Path(job.dst), job.raw, job.num_classes)
    counts = class_counts(done.train_ids, job.num_classes)
    return job.dst, counts, done.rewritten, done.all_ignore, done.train_ids.shape[:2]


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the main process (one message instead of one per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(job: Callable[[Any], Any], tasks: list[Any], nproc: int, description: str) -> list[Any]:
    """``job`` over ``tasks`` (NamedTuples with a ``dst`` file) with a progress bar."""
    for folder in sorted({Path(t.dst).parent for t in tasks}):  # an interrupted run's leftovers
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps_in(folder)

    def progress(results: Iterable[Any]) -> Iterator[Any]:
        return iter(track(results, total=len(tasks), description=description))

    if nproc <= 1:
        return list(progress(map(job, tasks)))
    # Workers come from a fresh server process, never a fork of this one: a fork copies locks that
    # other threads (torch, a progress bar) may hold at that moment, and can hang.
    with get_context(START_METHOD).Pool(nproc, initializer=_ignore_sigint) as pool:
        return list(progress(pool.imap(job, tasks, chunksize=8)))


def rcs_statistics(
    per_file: list[tuple[str, dict[int, int]]],
) -> tuple[list[dict[str, Any]], dict[str, dict[int, int]], dict[int, list[list[Any]]]]:
    """The three §4.2 structures from (file, {class: count}) in file order."""
    sample_class_stats = [{**counts, "file": file} for file, counts in per_file]
    stats_dict = {file: counts for file, counts in per_file}
    with_class: dict[int, list[list[Any]]] = {}
    for file, counts in per_file:
        for c, n in counts.items():
            with_class.setdefault(c, []).append([file, n])
    return sample_class_stats, stats_dict, dict(sorted(with_class.items()))


def _split_tasks(fmt: DatasetFormat, root: Path, split: str) -> tuple[list[Job], dict[str, Path]]:
    """The label files of one split and the image of each. With the image folders present, every
    image must have a raw or converted label; without them (e.g. Cityscapes' gtFine alone) the
    label folders are scanned and converted alone."""
    dirs, raw, k = fmt.splits[split], fmt.raw_labels, fmt.classes.num_classes
    label_dir = root / (dirs.labels or ("",))[0]
    if not all((root / d).is_dir() for d in dirs.images):
        tasks = _scan_labels(fmt, root, dirs.labels or ())
        if not tasks:
            wanted = raw.suffix if raw is not None else fmt.label_suffix
            raise PrepareError(
                f"no label files *{wanted} under {label_dir} ({fmt.name} split {split}); "
                "extract the labels there"
            )
        return tasks, {}
    tasks, images, missing = [], {}, []
    for folder in dirs.images:
        for image in find_files(root / folder, f"*{fmt.image_suffix}"):
            dst = fmt.label_path(root, split, image)
            src = None if raw is None else fmt.label_path(root, split, image, raw.suffix)
            if src is not None and src.is_file():
                tasks.append(Job(str(src), str(dst), raw, k))
            elif dst.is_file():
                tasks.append(Job(None, str(dst), None, k))  # converted earlier, raw since removed
            else:
                missing.append(image)
                continue
            images[str(dst)] = image
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PrepareError(
            f"image {missing[0]} has no label in {label_dir}{more}; add its label or remove "
            "the image"
        )
    if not tasks:
        raise PrepareError(
            f"no images *{fmt.image_suffix} under {root / dirs.images[0]} ({fmt.name} split "
            f"{split}); extract the images there"
        )
    return tasks, images


def _scan_labels(fmt: DatasetFormat, root: Path, label_dirs: tuple[str, ...]) -> list[Job]:
    raw, k = fmt.raw_labels, fmt.classes.num_classes
    if raw is None:
        found = [p for d in label_dirs for p in find_files(root / d, f"*{fmt.label_suffix}")]
        return [Job(None, str(p), None, k) for p in found]
    tasks = []
    for src in (p for d in label_dirs for p in find_files(root / d, f"*{raw.suffix}")):
        if not src.name.endswith(fmt.label_suffix):  # not an output of an earlier run
            dst = src.with_name(src.name[: -len(raw.suffix)] + fmt.label_suffix)
            tasks.append(Job(str(src), str(dst), raw, k))
    return tasks


def prepare_dataset(
    fmt: DatasetFormat, root: Path, nproc: int, num_classes: int = NUM_CLASSES
) -> int:
    """Convert and check every labelled split of ``fmt`` under ``root``; write the RCS statistics
    of ``fmt.rcs_split``. Returns the number of label files."""
    check_num_classes(fmt, num_classes)
    splits = [
        s
        for s, dirs in fmt.splits.items()
        if dirs.labels and all((root / d).is_dir() for d in dirs.labels)
    ]
    if not splits:
        first = next(d.labels[0] for d in fmt.splits.values() if d.labels)
        raise PrepareError(
            f"{root / first} does not exist; ROOT must hold {fmt.name}'s labels "
            f"({fmt.layout(next(s for s, d in fmt.splits.items() if d.labels))})"
        )
    if fmt.rcs_split in splits:  # before anything is written
        _check_foreign_statistics(root, fmt.label_suffix)
    total = 0
    for split in splits:
        tasks, images = _split_tasks(fmt, root, split)
        results = _run(_job, tasks, nproc, f"{fmt.name} {split} labels ({len(tasks)})")
        _report(results)
        _check_sizes(fmt, results, images)
        if split == fmt.rcs_split:
            _write_rcs_statistics(root, results)
        total += len(tasks)
    return total


def _check_sizes(fmt: DatasetFormat, results: list[Any], images: dict[str, Path]) -> None:
    """A label of another size than its image: an error, or a warning where the format keeps
    such pairs (GTA5's quirk, docs/method.md §7.5)."""
    odd = [(dst, hw) for dst, *_, hw in results if dst in images and image_size(images[dst]) != hw]
    if not odd:
        return
    dst, (h, w) = odd[0]
    ih, iw = image_size(images[dst])
    text = f"label {dst} is {w}x{h} but its image {images[dst]} is {iw}x{ih}"
    if fmt.label_size == "strict":
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise PrepareError(f"{text}{more}; re-extract the pair or set label_size: keep")
    print(f"note: {len(odd)} labels differ in size from their images, e.g. {text}", file=sys.stderr)


def _write_rcs_statistics(root: Path, results: list[Any]) -> None:
    """Stats name files relative to ROOT and are matched by base name (§4.2), which must
    therefore be unique; the folder can then be moved."""
    per_file = [(Path(dst).relative_to(root).as_posix(), counts) for dst, counts, *_ in results]
    names: dict[str, str] = {}
    for file, _ in per_file:
        other = names.setdefault(Path(file).name, file)
        if other != file:
            raise PrepareError(
                f"labels {other} and {file} share a base name, which rare class sampling keys "
                "files by; rename one"
            )
    stats, stats_dict, with_class = rcs_statistics(per_file)
    atomic_write_json(root / "sample_class_stats.json", stats)
    atomic_write_json(root / "sample_class_stats_dict.json", stats_dict)
    atomic_write_json(root / "samples_with_class.json", with_class)


def _check_foreign_statistics(root: Path, label_suffix: str) -> None:
    """Statistics of labels with another suffix in ROOT come from another format's preparation of
    this folder: replacing them would break that dataset's rare class sampling."""
    path = root / "sample_class_stats.json"
    try:
        old = json.loads(path.read_text())[0]["file"] if path.is_file() else None
    except (ValueError, KeyError, IndexError, TypeError):
        return  # unreadable: ours to rewrite
    if isinstance(old, str) and not old.endswith(label_suffix):
        raise PrepareError(
            f"{path} holds the rare-class statistics of other labels ({old}, not "
            f"*{label_suffix}): another format prepared this folder; prepare a copy instead"
        )


def resized_copy(
    fmt: DatasetFormat, root: Path, out: Path, scale: tuple[int, int], splits: list[str], nproc: int
) -> int:
    """The pre-resized copy of ``root`` in ``out`` (`ssr.data.resized`); returns its file count."""
    jobs, links = copy_jobs(fmt, root, out, scale, splits)
    write_marker(out, fmt, root, scale, splits, complete=False)
    for original, copy in links:
        link(original, copy)
    _run(resize_file, jobs, nproc, f"{fmt.name} resized to {scale[0]}x{scale[1]} ({len(jobs)})")
    write_marker(out, fmt, root, scale, splits, complete=True)
    print(f"{fmt.name}: {len(jobs)} files resized into {out}; point data.*_root at it")
    return len(jobs)


def prepare_gta5(root: Path, nproc: int) -> int:
    return prepare_dataset(load_format("gta5"), root, nproc)


def prepare_cityscapes(root: Path, nproc: int) -> int:
    return prepare_dataset(load_format("cityscapes"), root, nproc)


def _report(results: list[Any]) -> None:
    """Say which outputs were repaired and which labels hold no evaluated class at all."""
    rewritten = [dst for dst, _, again, *_ in results if again]
    empty = [dst for dst, _, _, ignore, _ in results if ignore]
    if rewritten:
        print(f"rewrote {len(rewritten)} unusable earlier outputs, e.g. {rewritten[0]}")
    if empty:
        shown = ", ".join(empty[:3]) + (" ..." if len(empty) > 3 else "")
        print(
            f"warning: {len(empty)} labels map every pixel to ignore ({shown}): are they label ids "
            "of this dataset?",
            file=sys.stderr,
        )


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssr.data.prepare",
        description="Convert raw labels to train ids, check a dataset, write RCS statistics.",
    )
    parser.add_argument(
        "format", help="gta5, cityscapes, synthia, acdc, acdc_flat, darkzurich or a format YAML"
    )
    parser.add_argument("root", type=Path, help="dataset root (the folder you extracted)")
    parser.add_argument("--nproc", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument(
        "--resized",
        type=Path,
        metavar="OUT",
        help="also write a copy whose --splits are pre-resized to --scale (same training pixels)",
    )
    parser.add_argument(
        "--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="keep-ratio resize box"
    )
    parser.add_argument("--splits", nargs="+", default=["train"], help="splits to resize")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=NUM_CLASSES,
        help="outputs of the model's head (default 19, the shipped models)",
    )
    args = parser.parse_args(argv)
    if (args.resized is None) != (args.scale is None):
        parser.error("--resized OUT and --scale LONG SHORT go together")
    if args.scale is not None and min(args.scale) <= 0:
        parser.error(f"--scale {args.scale} must be two positive sizes (long, short)")
    fmt = load_format(args.format)
    root: Path = args.root
    if not root.is_dir():
        raise PrepareError(f"dataset root {root} does not exist; pass the folder you extracted")
    if args.resized is not None:
        check_copy(fmt, root, args.resized, args.splits)
    try:
        count = prepare_dataset(fmt, root, args.nproc, args.num_classes)
        if args.resized is not None:
            resized_copy(fmt, root, args.resized, tuple(args.scale), args.splits, args.nproc)
    except OSError as err:  # e.g. a read-only dataset folder
        where = err.filename or root
        raise PrepareError(f"cannot write to {where}: {err.strerror or err}") from err
    print(f"{fmt.name}: {count} label files ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
