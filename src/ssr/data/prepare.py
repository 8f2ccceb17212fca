"""Label preparation CLI: label ids -> train-id PNGs, plus the GTA5 RCS statistics.

    python -m ssr.data.prepare gta5 ROOT [--nproc N]
    python -m ssr.data.prepare cityscapes ROOT [--nproc N]

GTA5 (docs/method.md §7.2): every ``ROOT/labels/*<digit>.png`` (a palette PNG whose index is the
Cityscapes label id; decoded by index, never by colour) becomes ``*_labelTrainIds.png`` next to it,
and the per-file class pixel counts at full resolution go to ``sample_class_stats.json``,
``sample_class_stats_dict.json`` and ``samples_with_class.json`` in ROOT (§4.2).
Cityscapes (§7.4): every ``gtFine/*/*/*_gtFine_labelIds.png`` of all splits becomes
``*_gtFine_labelTrainIds.png``. Deviation: the reference rasterises the polygon JSONs instead;
mapping the shipped labelIds gives the same classes up to rasterisation differences.

Re-running is safe: finished outputs are kept (only read back for the statistics) and every file
is written to a temporary name first and moved into place (``ssr.io.atomic_write``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.progress import track

from ssr.data.labels import IGNORE_INDEX, NUM_CLASSES, label_ids_to_train_ids
from ssr.errors import UserError
from ssr.io import atomic_write, atomic_write_json, remove_stale_temps_in
from ssr.run.cli import cli

GTA_LABEL_PATTERN = re.compile(r"\d\.png$")  # skips already converted *_labelTrainIds.png
GTA_SUFFIX = "_labelTrainIds.png"
CS_IN_SUFFIX, CS_OUT_SUFFIX = "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"


class PrepareError(UserError, RuntimeError):
    """An input that cannot be converted; the message names the file and the fix."""


def _read_label_ids(path: Path) -> np.ndarray:
    """(H, W) label ids of a palette ("P") or grayscale ("L") PNG, read by index."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            ids = np.asarray(im)
    except (OSError, UnidentifiedImageError) as err:
        raise PrepareError(
            f"cannot read label {path} ({err}); restore it from the archive"
        ) from err
    if mode not in ("P", "L"):
        raise PrepareError(
            f"label {path} has PNG mode {mode}; expected a palette (P) or 8-bit (L) PNG of "
            "label ids — colour-coded labels must be converted to ids first"
        )
    return ids


def _write_png_atomic(array: np.ndarray, path: Path) -> None:
    """An 8-bit (mode L) PNG; an interrupted run never leaves a half-written label behind."""
    image = Image.fromarray(array.astype(np.uint8, copy=False))
    atomic_write(path, lambda f: image.save(f, format="PNG"), durable=False)


class Converted(NamedTuple):
    """One label file's outcome: its train ids, and what the conversion had to say about it."""

    train_ids: np.ndarray
    rewritten: bool  # an existing output was unusable and has been written anew
    all_ignore: bool  # every pixel maps to ignore: label ids of another dataset? colours?


def convert_label(src: Path, dst: Path) -> Converted:
    """Write ``dst`` (uint8 train ids) from label-id PNG ``src`` unless a sound one exists.

    An existing ``dst`` is kept only if it is an 8-bit single-channel PNG of ``src``'s size holding
    train ids (0..18, 255): leftovers of an interrupted or foreign conversion are rewritten, so
    re-running prepare repairs a dataset (and its RCS statistics).
    """
    existed = dst.is_file()
    existing = _sound_output(src, dst) if existed else None
    if existing is not None:
        return Converted(existing, False, not (existing != IGNORE_INDEX).any())
    train_ids = label_ids_to_train_ids(_read_label_ids(src))
    _write_png_atomic(train_ids, dst)
    return Converted(train_ids, existed, not (train_ids != IGNORE_INDEX).any())


def _sound_output(src: Path, dst: Path) -> np.ndarray | None:
    """``dst``'s train ids if it is a valid conversion of ``src``, else None."""
    try:
        with Image.open(dst) as out, Image.open(src) as raw:
            if out.mode != "L" or out.size != raw.size:
                return None
            train_ids = np.asarray(out)
    except (OSError, UnidentifiedImageError, SyntaxError):
        return None
    bad = (train_ids >= NUM_CLASSES) & (train_ids != IGNORE_INDEX)
    return None if bad.any() else train_ids


def class_counts(train_ids: np.ndarray) -> dict[int, int]:
    """Pixel count of every train id present (ignore pixels and absent classes omitted)."""
    counts = np.bincount(train_ids.ravel(), minlength=256)[:NUM_CLASSES]
    return {c: int(n) for c, n in enumerate(counts) if n > 0}


def _job(args: tuple[str, str]) -> tuple[str, dict[int, int], bool, bool]:
    """(output, class counts, rewritten, all ignore) of one (source, output) pair."""
    src, dst = Path(args[0]), Path(args[1])
    done = convert_label(src, dst)
    return args[1], class_counts(done.train_ids), done.rewritten, done.all_ignore


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the main process (one message instead of one per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(
    job: Callable[[tuple[str, str]], Any],
    tasks: list[tuple[str, str]],
    nproc: int,
    description: str,
) -> list[Any]:
    for folder in sorted({Path(dst).parent for _, dst in tasks}):  # an interrupted run's leftovers
        remove_stale_temps_in(folder)

    def progress(results: Iterable[Any]) -> Iterator[Any]:
        return iter(track(results, total=len(tasks), description=description))

    if nproc <= 1:
        return list(progress(map(job, tasks)))
    with Pool(nproc, initializer=_ignore_sigint) as pool:
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


def prepare_gta5(root: Path, nproc: int) -> int:
    label_dir = root / "labels"
    if not label_dir.is_dir():
        raise PrepareError(f"{label_dir} does not exist; ROOT must hold GTA5's images/ and labels/")
    sources = sorted(p for p in label_dir.glob("*.png") if GTA_LABEL_PATTERN.search(p.name))
    if not sources:
        raise PrepareError(f"no label files NNNNN.png in {label_dir}; extract GTA5's labels there")
    # Stats name files relative to ROOT (matched by base name), so the folder can be moved.
    tasks = [(str(p), str(p.with_name(p.stem + GTA_SUFFIX))) for p in sources]
    results = _run(_job, tasks, nproc, f"GTA5 labels ({len(tasks)})")
    _report(results)
    per_file = [(str(Path(dst).relative_to(root)), counts) for dst, counts, *_ in results]
    stats, stats_dict, with_class = rcs_statistics(per_file)
    atomic_write_json(root / "sample_class_stats.json", stats)
    atomic_write_json(root / "sample_class_stats_dict.json", stats_dict)
    atomic_write_json(root / "samples_with_class.json", with_class)
    return len(tasks)


def prepare_cityscapes(root: Path, nproc: int) -> int:
    gt_dir = root / "gtFine"
    if not gt_dir.is_dir():
        raise PrepareError(f"{gt_dir} does not exist; ROOT must hold Cityscapes' gtFine/")
    sources = sorted(gt_dir.glob(f"*/*/*{CS_IN_SUFFIX}"))
    if not sources:
        raise PrepareError(f"no gtFine/SPLIT/CITY/*{CS_IN_SUFFIX} under {gt_dir}; extract gtFine")
    tasks = [
        (str(p), str(p.with_name(p.name[: -len(CS_IN_SUFFIX)] + CS_OUT_SUFFIX))) for p in sources
    ]
    _report(_run(_job, tasks, nproc, f"Cityscapes labels ({len(tasks)})"))
    return len(tasks)


def _report(results: list[tuple[str, dict[int, int], bool, bool]]) -> None:
    """Say which outputs were repaired and which labels hold no evaluated class at all."""
    rewritten = [dst for dst, _, again, _ in results if again]
    empty = [dst for dst, _, _, ignore in results if ignore]
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
        description="Convert label ids to train ids (and write GTA5's rare-class statistics).",
    )
    parser.add_argument("dataset", choices=("gta5", "cityscapes"))
    parser.add_argument(
        "root", type=Path, help="dataset root (GTA5: images/, labels/; CS: gtFine/)"
    )
    parser.add_argument("--nproc", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    root: Path = args.root
    if not root.is_dir():
        raise PrepareError(f"dataset root {root} does not exist; pass the folder you extracted")
    prepare = prepare_gta5 if args.dataset == "gta5" else prepare_cityscapes
    try:
        count = prepare(root, args.nproc)
    except OSError as err:  # e.g. a read-only dataset folder
        where = err.filename or root
        raise PrepareError(f"cannot write to {where}: {err.strerror or err}") from err
    print(f"{args.dataset}: {count} label files ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
