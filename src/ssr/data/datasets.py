"""GTA5 and Cityscapes datasets in their converted on-disk layouts (docs/method.md §7.3-§7.5).

Images are read with OpenCV (BGR -> RGB uint8), labels with Pillow unchanged (train ids, 255 =
ignore), as in mmseg (§4.1 step 1). File lists are sorted, so indices are stable across machines.
Every layout or file problem raises ``DatasetError`` with one line naming the path and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ssr.data.labels import IGNORE_INDEX, NUM_CLASSES
from ssr.data.transforms import test_transform
from ssr.errors import UserError
from ssr.io import find_files
from ssr.model.inference import Inference

Transform = Callable[..., dict[str, Any]]

PREPARE_HINT = "python -m ssr.data.prepare {dataset} {root}"


class DatasetError(UserError, RuntimeError):
    """A dataset folder or file that cannot be used; the message names the path and the fix."""


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB image; raises DatasetError for a missing or undecodable file.

    OpenCV refuses a truncated PNG but decodes a truncated JPEG with a grey lower part, so a JPEG
    must end with its end-of-image marker (looked for in the file's last kilobyte).
    """
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or (Path(path).suffix.lower() in JPEG_SUFFIXES and not _jpeg_complete(path)):
        raise DatasetError(
            f"cannot read image {path} (missing, truncated or not an image); "
            "restore it from the dataset archive or delete it"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


JPEG_SUFFIXES = (".jpg", ".jpeg")


def _jpeg_complete(path: Path) -> bool:
    """Whether the JPEG's end-of-image marker FF D9 is there (entropy-coded data never holds
    it: 0xFF bytes in it are stuffed); trailing padding after it is allowed."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(f.tell() - 1024, 0))
        return b"\xff\xd9" in f.read()


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header alone (a cheap start-up check)."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"cannot read image {path} ({type(err).__name__}); restore it") from err


def read_label(path: Path) -> np.ndarray:
    """(H, W) uint8 train-id label read unchanged; rejects files that are not train-id maps."""
    try:
        with Image.open(path) as im:
            label = np.array(im)  # a writable copy (torch warns on read-only arrays)
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(
            f"cannot read label {path} ({err.__class__.__name__}); "
            "re-run the preparation CLI (python -m ssr.data.prepare) to rewrite it"
        ) from err
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(
            f"label {path} is not a single-channel 8-bit train-id PNG (shape {label.shape}, "
            f"{label.dtype}); write it with python -m ssr.data.prepare"
        )
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(
            f"label {path} holds value {int(label[bad][0])}, not a train id (0..18 or 255); "
            "was it converted from label ids? re-run python -m ssr.data.prepare"
        )
    return label


def _check_root(root: Path, name: str, expected: str) -> None:
    if not root.is_dir():
        raise DatasetError(
            f"{name} root {root} does not exist; set it to the folder that holds {expected}"
        )
    if not any(root.iterdir()):
        raise DatasetError(
            f"{name} root {root} is empty; extract the dataset so that it holds {expected}"
        )


def _missing_label_error(
    image: Path, label: Path, n_missing: int, raw_label: Path, prepare_hint: str
) -> DatasetError:
    more = f" (and {n_missing - 1} more)" if n_missing > 1 else ""
    if raw_label.is_file():
        return DatasetError(
            f"label {label} for image {image} not converted yet{more}; run {prepare_hint}"
        )
    return DatasetError(
        f"image {image} has no label {label}{more}; restore the label or remove the image"
    )


class _SegmentationFiles(Dataset):
    """Sorted (image, label) pairs: ``read`` gives arrays, ``__getitem__`` a transformed item."""

    images: list[Path]
    labels: list[Path] | None

    def __init__(self, transform: Transform | None):
        # Default: full-resolution normalised tensors, no geometry (the pipelines add it).
        self.transform = transform if transform is not None else test_transform(None)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W, 3) uint8 RGB image and (H', W') uint8 label (None without labels)."""
        image = read_image(self.images[index])
        if self.labels is None:
            return image, None
        return image, self.fit_label(image, read_label(self.labels[index]), index)

    def fit_label(self, image: np.ndarray, label: np.ndarray, index: int) -> np.ndarray:
        """Hook for image/label size mismatches; the base class leaves the pair as it is."""
        return label

    def make_item(
        self,
        index: int,
        image: np.ndarray,
        label: np.ndarray | None,
        transform: Transform | None = None,
    ) -> dict[str, Any]:
        """Run ``transform`` (default: the dataset's) and package the dict item of the contract."""
        data = {"image": image} if label is None else {"image": image, "mask": label}
        out = (transform or self.transform)(**data)
        item = {
            "img": out["image"].float(),
            "path": str(self.images[index]),
            "ori_size": torch.tensor(image.shape[:2], dtype=torch.int64),
        }
        if label is not None:
            item["label"] = torch.as_tensor(out["mask"]).long()
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.read(index)
        return self.make_item(index, image, label)


class GTA5Dataset(_SegmentationFiles):
    """GTA5: ``images/NNNNN.png`` + ``labels/NNNNN_labelTrainIds.png`` (all frames, no split).

    Image/label pairs of different sizes (a real GTA5 quirk, §7.5) are passed on unchanged by
    default, so the pipeline rescales each on its own and the label ends up slightly
    mis-registered, exactly as in the reference. ``align_label_to_image=True`` is a documented
    deviation: the label is first resized (nearest) to the image size.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        align_label_to_image: bool = False,
    ):
        super().__init__(transform)
        self.root = Path(root)
        self.align_label_to_image = align_label_to_image
        layout = "images/NNNNN.png and labels/NNNNN_labelTrainIds.png"
        _check_root(self.root, "GTA5", layout)
        image_dir, label_dir = self.root / "images", self.root / "labels"
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(
                    f"GTA5 root {self.root} has no {folder.name}/ folder; it must hold {layout}"
                )
        self.images = sorted(image_dir.glob("*.png"))
        if not self.images:
            raise DatasetError(f"no *.png images in {image_dir}; the root must hold {layout}")
        self.labels = [label_dir / f"{p.stem}_labelTrainIds.png" for p in self.images]
        present = {p.name for p in label_dir.glob("*_labelTrainIds.png")}
        missing = [i for i, p in enumerate(self.labels) if p.name not in present]
        if missing:
            i = missing[0]
            raise _missing_label_error(
                self.images[i],
                self.labels[i],
                len(missing),
                label_dir / self.images[i].name,
                PREPARE_HINT.format(dataset="gta5", root=self.root),
            )
        self.label_index = {p.name: i for i, p in enumerate(self.labels)}

    def fit_label(self, image: np.ndarray, label: np.ndarray, index: int) -> np.ndarray:
        if self.align_label_to_image and label.shape != image.shape[:2]:
            height, width = image.shape[:2]
            return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        return label


class CityscapesDataset(_SegmentationFiles):
    """Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` (recursive scan, sorted) with
    ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png``; ``label=False`` needs no gtFine at all
    (the target training images, whose labels UDA never reads).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        label: bool = True,
    ):
        super().__init__(transform)
        self.root, self.split = Path(root), split
        layout = (
            f"leftImg8bit/{split}/CITY/*_leftImg8bit.png and "
            f"gtFine/{split}/CITY/*_gtFine_labelTrainIds.png"
        )
        _check_root(self.root, "Cityscapes", layout)
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise DatasetError(
                f"Cityscapes root {self.root} has no leftImg8bit/{split}/ folder; "
                f"it must hold {layout}"
            )
        self.images = find_files(image_dir, "*_leftImg8bit.png")
        if not self.images:
            raise DatasetError(
                f"no *_leftImg8bit.png images under {image_dir}; expected CITY/*_leftImg8bit.png"
            )
        if not label:
            self.labels = None
            return
        label_dir = self.root / "gtFine" / split
        if not label_dir.is_dir():
            raise DatasetError(
                f"Cityscapes root {self.root} has no gtFine/{split}/ folder; extract gtFine there"
            )
        self.labels = [self._label_path(p, "labelTrainIds") for p in self.images]
        missing = [i for i, p in enumerate(self.labels) if not p.is_file()]
        if missing:
            i = missing[0]
            raise _missing_label_error(
                self.images[i],
                self.labels[i],
                len(missing),
                self._label_path(self.images[i], "labelIds"),
                PREPARE_HINT.format(dataset="cityscapes", root=self.root),
            )

    def _label_path(self, image: Path, kind: str) -> Path:
        relative = image.relative_to(self.root / "leftImg8bit" / self.split)
        stem = relative.name[: -len("_leftImg8bit.png")]
        return self.root / "gtFine" / self.split / relative.parent / f"{stem}_gtFine_{kind}.png"

    def check_pairs(self) -> None:
        """Every image/label pair readable and of one size, from headers and a checksum pass
        over the labels (no decoding): a bad val file fails at start-up, not after training."""
        assert self.labels is not None
        for image, label in zip(self.images, self.labels, strict=True):
            try:
                with Image.open(label) as im:
                    label_hw = (im.height, im.width)
                    im.verify()  # PNG chunk checksums: catches a truncated or damaged file
            except (OSError, UnidentifiedImageError, SyntaxError) as err:
                raise DatasetError(
                    f"cannot read label {label} ({type(err).__name__}: truncated or damaged?); "
                    "re-extract it or re-run python -m ssr.data.prepare"
                ) from err
            if image_size(image) != label_hw:
                (h, w), (lh, lw) = image_size(image), label_hw
                raise DatasetError(
                    f"label {label} is {lw}x{lh} but image {image} is {w}x{h}; re-extract the pair"
                )

    def fit_label(self, image: np.ndarray, label: np.ndarray, index: int) -> np.ndarray:
        # Cityscapes has no size quirk; a mismatch would silently shift the full-res metric.
        if label.shape != image.shape[:2]:
            assert self.labels is not None
            raise DatasetError(
                f"label {self.labels[index]} is {label.shape[1]}x{label.shape[0]} but image "
                f"{self.images[index]} is {image.shape[1]}x{image.shape[0]}; re-extract the pair"
            )
        return label


class TestTimeViews(Dataset):
    """The items of a dataset with `img` as a list: the image at every test scale of `inference`
    (one scale without multi-scale test-time augmentation); `label` stays at full resolution."""

    def __init__(self, dataset: _SegmentationFiles, inference: Inference) -> None:
        self.dataset, self.inference = dataset, inference

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.dataset.read(index)
        first, *rest = self.inference.resizes(image.shape[:2])
        item = self.dataset.make_item(index, image, label, test_transform(first))
        views = [self.dataset.make_item(index, image, None, test_transform(r))["img"] for r in rest]
        return item | {"img": [item["img"], *views]}
