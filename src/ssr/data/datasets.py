"""Datasets in their converted on-disk layouts, one class for every `DatasetFormat`
(docs/method.md §7.3-§7.5, docs/benchmarks.md).

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

from ssr.data.files import DatasetError, image_size, read_image, read_label
from ssr.data.formats import DatasetFormat, load_format
from ssr.data.labels import NUM_CLASSES
from ssr.data.transforms import test_transform
from ssr.io import find_files
from ssr.model.inference import Inference

Transform = Callable[..., dict[str, Any]]

PREPARE_HINT = "python -m ssr.data.prepare {dataset} {root}"


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
    image: Path, label: Path, n_missing: int, raw_label: Path | None, prepare_hint: str
) -> DatasetError:
    more = f" (and {n_missing - 1} more)" if n_missing > 1 else ""
    if raw_label is not None and raw_label.is_file():
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
    num_classes: int = NUM_CLASSES  # label values above it (but 255) are refused

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
        label = read_label(self.labels[index], self.num_classes)
        return image, self.fit_label(image, label, index)

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


class FolderDataset(_SegmentationFiles):
    """One split of a dataset described by a `DatasetFormat` (images scanned recursively, sorted;
    labels paired by the format's rule).

    ``label_fit`` says what a label of another size than its image becomes: ``keep`` passes it on
    unchanged (the pipeline rescales each on its own: GTA5's faithful quirk, §7.5), ``align``
    resizes it (nearest) to the image first (a documented deviation), ``strict`` refuses it (a
    mismatch would silently shift a full-resolution metric). ``label=False`` needs no label
    folder at all (target training images, whose labels UDA never reads).
    """

    def __init__(
        self,
        root: str | Path,
        fmt: DatasetFormat | str,
        split: str = "train",
        transform: Transform | None = None,
        label: bool = True,
        label_fit: str | None = None,
    ):
        super().__init__(transform)
        self.format = fmt if isinstance(fmt, DatasetFormat) else load_format(fmt)
        self.root, self.split = Path(root), split
        self.num_classes = self.format.classes.num_classes
        self.label_fit = label_fit or self.format.label_size
        dirs = self.format.split(split)
        if label and dirs.labels is None:
            raise DatasetError(
                f"split {split} of dataset format {self.format.name} has no labels; "
                "evaluate on a labelled split (e.g. val)"
            )
        name, layout = self.format.name, self.format.layout(split)
        _check_root(self.root, name, layout)
        self.images = []
        for folder in dirs.images:
            if not (self.root / folder).is_dir():
                raise DatasetError(
                    f"{name} root {self.root} has no {folder}/ folder; it must hold {layout}"
                )
            self.images += find_files(self.root / folder, f"*{self.format.image_suffix}")
        if not self.images:
            raise DatasetError(
                f"no *{self.format.image_suffix} images under {self.root / dirs.images[0]}; "
                f"{name} split {split} must hold {layout}"
            )
        self.labels = None
        if label:
            self._pair_labels(dirs.labels or ())

    def _pair_labels(self, label_dirs: tuple[str, ...]) -> None:
        for folder in label_dirs:
            if not (self.root / folder).is_dir():
                raise DatasetError(
                    f"{self.format.name} root {self.root} has no {folder}/ folder; extract the "
                    "labels there"
                )
        fmt = self.format
        labels = [fmt.label_path(self.root, self.split, p) for p in self.images]
        missing = [i for i, p in enumerate(labels) if not p.is_file()]
        if missing:
            i = missing[0]
            raw = fmt.raw_labels
            raw_path = (
                None
                if raw is None
                else fmt.label_path(self.root, self.split, self.images[i], raw.suffix)
            )
            hint = PREPARE_HINT.format(dataset=fmt.source or fmt.name, root=self.root)
            raise _missing_label_error(self.images[i], labels[i], len(missing), raw_path, hint)
        self.labels = labels
        self.label_index = {p.name: i for i, p in enumerate(labels)}

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
            if self.label_fit == "strict" and image_size(image) != label_hw:
                (h, w), (lh, lw) = image_size(image), label_hw
                raise DatasetError(
                    f"label {label} is {lw}x{lh} but image {image} is {w}x{h}; re-extract the pair"
                )

    def fit_label(self, image: np.ndarray, label: np.ndarray, index: int) -> np.ndarray:
        if label.shape == image.shape[:2] or self.label_fit == "keep":
            return label
        if self.label_fit == "align":
            height, width = image.shape[:2]
            return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        assert self.labels is not None
        raise DatasetError(
            f"label {self.labels[index]} is {label.shape[1]}x{label.shape[0]} but image "
            f"{self.images[index]} is {image.shape[1]}x{image.shape[0]}; re-extract the pair"
        )


class GTA5Dataset(FolderDataset):
    """GTA5: ``images/NNNNN.png`` + ``labels/NNNNN_labelTrainIds.png`` (all frames, no split).

    Image/label pairs of different sizes (a real GTA5 quirk, §7.5) are passed on unchanged by
    default, exactly as in the reference; ``align_label_to_image=True`` is a documented deviation.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        align_label_to_image: bool = False,
    ):
        fit = "align" if align_label_to_image else "keep"
        super().__init__(root, "gta5", "train", transform, label=True, label_fit=fit)


class CityscapesDataset(FolderDataset):
    """Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` (recursive scan, sorted) with
    ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png``; pairs must have one size."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        label: bool = True,
    ):
        super().__init__(root, "cityscapes", split, transform, label=label)


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
