"""Writing the dataset: raw GTA5 and Cityscapes file layouts, the OUT folder checks, the CLI.

`synthetic.json` in OUT records the settings and is written first (complete=false) and last
(complete=true), so a rerun can tell a finished set from an interrupted one or a foreign folder.
The opt-in extra formats (SYNTHIA, ACDC, Dark Zurich, see `formats`) are recorded in it under
`benchmarks` only when requested, so a default set's marker is unchanged; asking a complete set for
more of them adds only those.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress

from ssr.data.formats import load_format
from ssr.data.prepare import prepare_cityscapes, prepare_dataset, prepare_gta5
from ssr.data.synthetic.formats import BENCHMARK_DIRS, BENCHMARKS, format_jobs, write_format_job
from ssr.data.synthetic.style import SOURCE_SIZE, TARGET_SIZE, make_sample
from ssr.errors import UserError
from ssr.io import atomic_write_json, atomic_write_png
from ssr.run.cli import cli

# GTA5 label palette: index = Cityscapes label id 0..34 (note "static" is (20, 20, 20) in GTA5,
# unlike cityscapesScripts' (0, 0, 0)); the remaining 221 entries of the PNG palette are black.
GTA_LABEL_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (20, 20, 20), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32), (0, 0, 142),
)  # fmt: skip

TRAIN_CITIES: tuple[str, ...] = ("pixelstadt", "synthburg")  # sorted: file order = index
VAL_CITIES: tuple[str, ...] = ("renderdorf", "shaderhausen")
MARKER_NAME = "synthetic.json"  # written first (complete=false) and last (complete=true)
FORMAT_VERSION = 2  # bump when the rendered output changes, so old folders are not reused
BASE_DIRS: tuple[str, ...] = ("gta", "cityscapes")  # always written; BENCHMARK_DIRS on request


class SyntheticDataError(UserError, RuntimeError):
    """Bad output folder or arguments for the synthetic dataset generator."""


def gta_label_image(label: np.ndarray) -> Image.Image:
    """GTA5's label format: a palette PNG whose index is the Cityscapes label id."""
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    palette = [c for rgb in GTA_LABEL_PALETTE for c in rgb]
    image.putpalette(palette + [0] * (768 - len(palette)))
    return image


def _jobs(
    out: Path, num_source: int, num_target_train: int, num_target_val: int
) -> list[tuple[str, str, int, Path, Path]]:
    """(domain, split, index, image path, label path) for every image to write."""
    jobs = []
    gta = out / "gta"
    for i in range(num_source):
        name = f"{i + 1:05d}.png"
        jobs.append(("source", "train", i, gta / "images" / name, gta / "labels" / name))
    cs = out / "cityscapes"
    for split, count, cities in (
        ("train", num_target_train, TRAIN_CITIES),
        ("val", num_target_val, VAL_CITIES),
    ):
        for i in range(count):
            city = cities[i * len(cities) // count]  # contiguous blocks per city
            stem = f"{city}_{i:06d}_000019"
            jobs.append(
                (
                    "target",
                    split,
                    i,
                    cs / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                    cs / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                )
            )
    return jobs


class _Plan(NamedTuple):
    """What a run writes into OUT: gta/ + cityscapes/ or not, which extra formats, the marker."""

    base: bool
    benchmarks: tuple[str, ...]
    marker: dict


def _dirs(benchmarks: Sequence[str]) -> list[str]:
    """The folders of OUT that a set with these extra formats consists of."""
    return [*BASE_DIRS, *(BENCHMARK_DIRS[b] for b in benchmarks)]


def _refuse_foreign(out: Path, subs: Sequence[str], why: str) -> None:
    """Never write into (or delete) a folder that no run of this generator recorded."""
    for sub in subs:
        if (out / sub).exists():
            raise SyntheticDataError(
                f"{out / sub} exists but was not written by ssr.data.synthetic ({why}); "
                "refusing to touch it, choose an empty output folder"
            )


def _check_out(out: Path, params: dict, force: bool) -> _Plan | None:
    """Decide what to do with OUT: a plan of what to write, or None = already generated."""
    requested = tuple(params.get("benchmarks", ()))
    full = _Plan(True, requested, params)
    if out.exists() and not out.is_dir():
        raise SyntheticDataError(f"output path {out} exists and is not a directory; pass a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return full
    marker = out / MARKER_NAME
    try:
        previous = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        previous = {}  # an unreadable marker of ours: treat as an interrupted run
    if previous is None:
        _refuse_foreign(out, _dirs(requested), f"no {MARKER_NAME}")
        if force:
            return full
        raise SyntheticDataError(
            f"output folder {out} is not empty; choose an empty or new folder (or pass --force)"
        )
    if not isinstance(previous, dict):
        previous = {}
    had = tuple(b for b in BENCHMARKS if b in (previous.get("benchmarks") or ()))
    settings = {k: v for k, v in params.items() if k != "benchmarks"}
    same = {k: previous.get(k) for k in settings} == settings
    if previous.get("complete") and same and not force:
        new = tuple(b for b in requested if b not in had)
        if not new:
            return None
        _refuse_foreign(out, _dirs(new)[len(BASE_DIRS) :], f"not in {MARKER_NAME}")
        union = [b for b in BENCHMARKS if b in had or b in new]
        return _Plan(False, new, {**settings, "benchmarks": union})
    same_settings = all(previous.get(k) == v for k, v in settings.items() if k != "version")
    if previous.get("complete") and same_settings and previous.get("version") != params["version"]:
        force = True  # a set that only an older generator version wrote is ours to replace
    if not force:
        what = "other settings" if previous.get("complete") else "an interrupted run"
        raise SyntheticDataError(
            f"{out} holds a synthetic dataset from {what}; pass --force to regenerate it"
        )
    ours = _dirs(had)  # what the marker says a run of this generator wrote
    _refuse_foreign(out, [d for d in _dirs(requested) if d not in ours], f"not in {MARKER_NAME}")
    for sub in ours:
        if (out / sub).exists():
            try:
                shutil.rmtree(out / sub)
            except OSError as e:
                raise SyntheticDataError(f"cannot delete {out / sub}: {e.strerror or e}") from e
    return full


def _write_marker(out: Path, params: dict, complete: bool) -> None:
    """Record the settings in OUT; durable, because a rerun trusts it to skip or refuse OUT."""
    atomic_write_json(out / MARKER_NAME, {**params, "complete": complete})


def _write_job(job: tuple[str, str, int, Path, Path], seed: int) -> None:
    """Render one sample and write its image and its label in the domain's raw format."""
    domain, split, index, image_path, label_path = job
    image, label = make_sample(domain, split, index, seed)
    atomic_write_png(image_path, image)
    label_image = gta_label_image(label) if domain == "source" else Image.fromarray(label)
    atomic_write_png(label_path, label_image)


def generate(
    out: Path | str,
    seed: int = 0,
    num_source: int = 200,
    num_target_train: int = 100,
    num_target_val: int = 50,
    force: bool = False,
    progress: bool = False,
    benchmarks: Sequence[str] = (),
) -> bool:
    """Write the synthetic source (GTA5 format) and target (Cityscapes format) sets under `out`,
    and the same kind of scenes in the extra raw formats named in `benchmarks` ("synthia",
    "acdc", "darkzurich": `synthia/`, `acdc/`, `dark_zurich/`; layouts and counts in `formats`).

    Returns False, writing nothing, when `out` already holds a complete set made with the same
    settings and at least these benchmarks; a complete set with the same settings gets only the
    missing benchmarks added. An existing non-empty `out` is otherwise refused unless `force`
    (which deletes only the folders that a previous run of this generator recorded writing).
    """
    out = Path(out)
    benchmarks = (benchmarks,) if isinstance(benchmarks, str) else benchmarks
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise SyntheticDataError(f"benchmarks must be among {', '.join(BENCHMARKS)}, got {unknown}")
    for name, count in (
        ("num_source", num_source),
        ("num_target_train", num_target_train),
        ("num_target_val", num_target_val),
    ):
        if count < 1:
            raise SyntheticDataError(f"{name} must be at least 1, got {count}")
    params = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "num_source": num_source,
        "num_target_train": num_target_train,
        "num_target_val": num_target_val,
        "source_size_hw": list(SOURCE_SIZE),
        "target_size_hw": list(TARGET_SIZE),
    }
    if benchmarks:  # absent otherwise: markers of default sets stay as they were
        params["benchmarks"] = [b for b in BENCHMARKS if b in benchmarks]
    plan = _check_out(out, params, force)
    if plan is None:
        return False
    jobs = _jobs(out, num_source, num_target_train, num_target_val) if plan.base else []
    extra = [
        job
        for b in plan.benchmarks
        for job in format_jobs(out, b, num_source, num_target_train, num_target_val)
    ]
    folders = {p.parent for job in jobs for p in job[3:]}
    folders |= {p.parent for job in extra for p in (job.image, job.label) if p is not None}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for folder in sorted(folders):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SyntheticDataError(
            f"cannot create folders under {out}: {e.strerror or e}; choose a writable folder"
        ) from e
    writes: list[Callable[[], None]] = [partial(_write_job, job, seed) for job in jobs]
    writes += [partial(write_format_job, job, seed) for job in extra]
    _write_marker(out, plan.marker, complete=False)
    if progress:
        with Progress(console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task("rendering synthetic scenes", total=len(writes))
            for write in writes:
                write()
                bar.advance(task)
    else:
        for write in writes:
            write()
    _write_marker(out, plan.marker, complete=True)
    return True


def generate_prepared(out: Path | str, nproc: int = 1, **settings: Any) -> bool:
    """`generate` (same settings), then the real preparation of every set (train-id labels, RCS
    statistics, label checks): a root ready for training. Cheap to repeat; it repairs what an
    interruption left. Returns whether images were written."""
    written = generate(out, **settings)
    prepare_gta5(Path(out) / "gta", nproc)
    prepare_cityscapes(Path(out) / "cityscapes", nproc)
    for benchmark in settings.get("benchmarks") or ():
        prepare_dataset(load_format(benchmark), Path(out) / BENCHMARK_DIRS[benchmark], nproc)
    return written


def positive_int(text: str) -> int:
    """argparse type for the image counts: an empty split would break the loaders."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@cli
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m ssr.data.synthetic OUT [--seed 0] [--num-source 200] ... [--benchmarks
    synthia acdc darkzurich] [--force]`."""
    parser = argparse.ArgumentParser(
        prog="python -m ssr.data.synthetic",
        description="Write the synthetic GTA5-format source and Cityscapes-format target sets, "
        "and on request the same kind of scenes in SYNTHIA, ACDC and Dark Zurich format.",
    )
    parser.add_argument(
        "out", type=Path, help="output folder (gets gta/, cityscapes/ and the --benchmarks ones)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-source", type=positive_int, default=200)
    parser.add_argument("--num-target-train", type=positive_int, default=100)
    parser.add_argument("--num-target-val", type=positive_int, default=50)
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        choices=BENCHMARKS,
        default=[],
        help="also write these raw formats: synthia -> OUT/synthia (one image per source image), "
        "acdc -> OUT/acdc (fog/night/rain/snow), darkzurich -> OUT/dark_zurich; added to a "
        "complete OUT with the same settings",
    )
    parser.add_argument("--force", action="store_true", help="regenerate a previous output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = generate(
        args.out,
        args.seed,
        args.num_source,
        args.num_target_train,
        args.num_target_val,
        force=args.force,
        progress=True,
        benchmarks=args.benchmarks,
    )
    if not written:
        print(f"{args.out} already holds this synthetic dataset; nothing to do (--force redoes it)")
        return 0
    if args.benchmarks:  # possibly only added to an existing set: say what OUT holds
        counts = (args.num_source, args.num_target_train, args.num_target_val)
        extra = ", ".join(
            f"{args.out / BENCHMARK_DIRS[b]} ({len(format_jobs(args.out, b, *counts))} {b} images)"
            for b in BENCHMARKS
            if b in args.benchmarks
        )
        took = time.perf_counter() - start
        print(
            f"done in {took:.1f}s: {extra}, beside {args.out / 'gta'} and {args.out / 'cityscapes'}"
        )
        return 0
    total = args.num_source + args.num_target_train + args.num_target_val
    print(
        f"wrote {total} images in {time.perf_counter() - start:.1f}s: {args.out / 'gta'} "
        f"({args.num_source}, GTA5 format) and {args.out / 'cityscapes'} "
        f"({args.num_target_train} train + {args.num_target_val} val, Cityscapes format)"
    )
    return 0
