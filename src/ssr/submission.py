"""Test-server submissions for ACDC and Dark Zurich: `ssr.predict ... format=acdc|darkzurich`.

Both servers read flat folders with one PNG per test image, named `<image stem>.png` (the stem keeps
`_rgb_anon`), holding Cityscapes train ids 0..18 as palette indices at the original image size.
ACDC wants `labelTrainIds/`; Dark Zurich also `labelTrainIds_invalid/` (255 = a pixel the method
declares invalid; we declare none, so a copy) and `confidence/` (16-bit, max softmax probability
x 65535). The folders are written into `output_dir`, checked against the input, and zipped with
the folders at the zip root as `<output_dir>/<format>_submission.zip` (docs/test-server.md).

Input selection: `input` is searched recursively; images in `*_ref` folders (the daytime reference
images) are never taken, and when some images lie in a folder named `test`, only those are taken,
so `input` may be the dataset root or its `rgb_anon` folder. Leftovers: a submission folder of
`output_dir` that already holds a file this input would not write is refused (files of the same
names, from a rerun, are overwritten), so the zip never mixes two exports.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssr.data.files import read_image
from ssr.data.labels import PALETTE
from ssr.errors import UserError
from ssr.io import WriteError, atomic_write, first_items, remove_stale_temps_in

log = logging.getLogger(__name__)

LABELS, INVALID, CONFIDENCE = "labelTrainIds", "labelTrainIds_invalid", "confidence"
CONF_SCALE = 65535  # a 16-bit confidence PNG holds round(probability * CONF_SCALE)
# The 19 Cityscapes colours as Pillow wants a palette: 256 RGB triples, flat.
FLAT_PALETTE = [c for rgb in PALETTE for c in rgb] + [0] * (768 - 3 * len(PALETTE))
TEST_FOLDER = "test"  # with one in the input tree, only the images below it are test images
REFERENCE_SUFFIX = "_ref"  # ACDC's and Dark Zurich's daytime reference images: never submitted


class SubmissionError(UserError, ValueError):
    """A test-server export that cannot be made (format, input or output_dir); one line, exit 2."""


@dataclass(frozen=True)
class SubmissionFormat:
    name: str  # the `format=` value
    title: str  # the benchmark, in messages
    folders: tuple[str, ...]  # top-level folders of the zip
    test_images: int  # images of the official test split
    split: str  # how they divide, in messages

    @property
    def confidence(self) -> bool:
        return CONFIDENCE in self.folders

    def zip_path(self, output_dir: Path) -> Path:
        return output_dir / f"{self.name}_submission.zip"


FORMATS = {
    "acdc": SubmissionFormat("acdc", "ACDC", (LABELS,), 2000, "500 each of fog, night, rain, snow"),
    "darkzurich": SubmissionFormat(
        "darkzurich", "Dark Zurich", (LABELS, INVALID, CONFIDENCE), 151, "night"
    ),
}


@dataclass(frozen=True)
class Plan:
    """What an export writes: `images` maps each file name (`<stem>.png`) to its input image."""

    fmt: SubmissionFormat
    output_dir: Path
    images: dict[str, Path]


def check_request(name: Any, video: bool, encoding: str, confidence: bool) -> SubmissionFormat:
    """The format named by `format=`, refusing settings the servers cannot take."""
    fmt = FORMATS.get(str(name))
    if fmt is None:
        raise SubmissionError(
            f"format={name} is not a test-server format; choose one of {', '.join(FORMATS)} "
            "(or leave format=null for per-image files)"
        )
    if video:
        raise SubmissionError(
            f"format={fmt.name} exports a folder of test images; a video has no submission"
        )
    if encoding != "trainid":
        raise SubmissionError(
            f"format={fmt.name} writes train ids, which the {fmt.title} server reads; "
            f"drop encoding={encoding}"
        )
    if confidence and not fmt.confidence:
        raise SubmissionError(
            f"format={fmt.name} submits {LABELS}/ only; drop confidence=true "
            "(format=darkzurich writes its confidence/ folder by itself)"
        )
    return fmt


def prepare(fmt: SubmissionFormat, images: list[Path], input_path: Path, output_dir: Path) -> Plan:
    """Select the test images, flatten their names and check `output_dir`, before any model load."""
    selected = select_test_images(images, input_path, output_dir, fmt)
    names: dict[str, Path] = {}
    for image in selected:
        name = f"{image.stem}.png"
        if name in names:
            raise SubmissionError(
                f"{names[name]} and {image} would both be {LABELS}/{name} (the submission is one "
                "flat folder); keep one of them out of input"
            )
        names[name] = image
    if len(names) != fmt.test_images:
        log.warning(
            f"format={fmt.name}: {len(names)} images, but the {fmt.title} test split has "
            f"{fmt.test_images} ({fmt.split}); the server needs all of them (fine for a subset "
            "or val)"
        )
    for folder in fmt.folders:
        path = output_dir / folder
        if path.exists() and not path.is_dir():
            raise SubmissionError(f"{path} is a file; the submission needs a folder there")
        if path.is_dir():
            remove_stale_temps_in(path)
            extra = sorted(p.name for p in path.iterdir() if p.name not in names)
            if extra:
                raise SubmissionError(
                    f"{path} already holds {len(extra)} files that are not predictions of this "
                    f"input {first_items(extra)}; choose a new output_dir or delete {path}"
                )
    return Plan(fmt, output_dir, dict(sorted(names.items())))


def select_test_images(
    images: list[Path], input_path: Path, output_dir: Path, fmt: SubmissionFormat
) -> list[Path]:
    """Drop reference images, an earlier export's files and, when some are in `test` folders,
    every image outside them."""
    if input_path.is_file():
        return images
    ours = [(output_dir / folder).resolve() for folder in fmt.folders]
    kept = []
    for image in images:
        folders = image.parent.relative_to(input_path).parts
        if any(f.endswith(REFERENCE_SUFFIX) for f in folders):
            continue
        if any(image.resolve().is_relative_to(folder) for folder in ours):
            continue
        kept.append((TEST_FOLDER in folders, image))
    in_test = [image for is_test, image in kept if is_test]
    selected = in_test or [image for _, image in kept]
    if not selected:
        raise SubmissionError(
            f"no test images under {input_path} (images in *{REFERENCE_SUFFIX} folders are "
            "reference images, not test images)"
        )
    if len(selected) < len(images):
        where = f"in '{TEST_FOLDER}' folders" if in_test else "outside *_ref folders"
        log.info(
            f"format={fmt.name}: {len(selected)} of the {len(images)} images under {input_path} "
            f"are {where}; only those are submitted"
        )
    return selected


def write(
    plan: Plan,
    predictor: Any,
    progress: Callable[[Iterable[Any], str, int], Iterator[Any]] = lambda items, *_: iter(items),
) -> list[Path]:
    """Predict every image into the submission folders, check them, zip them; returns the files.

    `predictor.predict(rgb, confidence)` gives (H, W) uint8 train ids and the (H, W) max softmax
    probability (`ssr.predict.Predictor`); `progress` wraps the loop (a progress bar).
    """
    fmt, out = plan.fmt, plan.output_dir
    for folder in fmt.folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    written = []
    what = f"Predicting the {fmt.title} test images"
    for name, image in progress(plan.images.items(), what, len(plan.images)):
        rgb = read_image(image)
        try:
            train_ids, conf = predictor.predict(rgb, fmt.confidence)
        except UserError as err:
            raise SubmissionError(f"{image}: {err}") from err
        files = {LABELS: palette_png(train_ids)}
        if INVALID in fmt.folders:
            files[INVALID] = files[LABELS]  # no pixel declared invalid (255)
        if fmt.confidence:
            files[CONFIDENCE] = png_bytes(confidence_map(conf))
        for folder, data in files.items():
            path = out / folder / name
            atomic_write(path, lambda f, d=data: f.write(d), durable=False)
            written.append(path)
    check_folders(plan)
    zip_path = fmt.zip_path(out)
    atomic_write(zip_path, lambda f: _zip(plan, f))
    log.info(
        f"Wrote {zip_path} for the {fmt.title} test server: {len(plan.images)} images in each of "
        f"{', '.join(f + '/' for f in fmt.folders)} ({zip_path.stat().st_size / 2**20:.1f} MiB)"
    )
    return [*written, zip_path]


def check_folders(plan: Plan) -> None:
    """Every submission folder holds exactly one file per input image, nothing else."""
    expected = set(plan.images)
    for folder in plan.fmt.folders:
        path = plan.output_dir / folder
        present = {p.name for p in path.iterdir()}
        missing, extra = sorted(expected - present), sorted(present - expected)
        if missing or extra:
            raise WriteError(
                f"{path}: {len(missing)} predictions missing {first_items(missing)}, "
                f"{len(extra)} other files {first_items(extra)}; the zip was not written"
            )


def palette_png(train_ids: np.ndarray) -> bytes:
    """(H, W) uint8 train ids -> a palette PNG: the ids as indices, the Cityscapes colours."""
    image = Image.fromarray(train_ids.astype(np.uint8))
    image.putpalette(FLAT_PALETTE)  # "L" -> "P", indices unchanged
    return png_bytes(image)


def confidence_map(conf: np.ndarray) -> np.ndarray:
    """(H, W) probabilities in [0, 1] -> uint16 round(p * 65535)."""
    return np.clip(np.rint(conf * CONF_SCALE), 0, CONF_SCALE).astype(np.uint16)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)  # uint16 -> "I;16"
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(plan: Plan, f: Any) -> None:
    # Stored, not deflated: PNGs are compressed already.
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for folder in plan.fmt.folders:
            for name in plan.images:
                archive.write(plan.output_dir / folder / name, f"{folder}/{name}")
