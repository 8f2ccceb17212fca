"""The UDA LightningDataModule: labelled source crops (RCS or uniform) + target crops, for any
pair of dataset formats (GTA5 -> Cityscapes by default; docs/benchmarks.md for the others).

docs/method.md §4.1, §4.2. Training is iteration-based: the train loader never ends
(Lightning's ``max_steps`` stops it). Training sample ``i`` is a pure function of (seed, i): the
source draw (RCS class and file, or a uniform file), the independent uniform target draw and the
augmentation seeds all come from ``np.random.default_rng([seed, i])``. Batches therefore do not
depend on ``num_workers`` or on worker seeding, and the checkpointed state is just the seed and the
next sample index (``state_dict``/``load_state_dict``, which Lightning stores in checkpoints).
Batches carry their sample indices, so the datamodule counts what training actually consumed
(not what the loader prefetched) and a resumed run continues exactly where the checkpoint was.
The seed defaults to ``torch.initial_seed()`` at setup, i.e. the global seed after
``lightning.seed_everything``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from ssr.data.datasets import FolderDataset
from ssr.data.files import image_size
from ssr.data.formats import ClassSet, load_format, resolve_eval_subsets
from ssr.data.rcs import RareClassSampler
from ssr.data.resized import MARKER as RESIZED_MARKER
from ssr.data.resized import check_resized
from ssr.data.scaling import rescale_size
from ssr.data.stream import InfiniteIndexSampler, UDATrainDataset
from ssr.data.transforms import (
    pseudo_margins_setting,
    source_train_transform,
    target_train_transform,
    test_transform,
)
from ssr.data.workers import worker_init
from ssr.errors import ConfigError, int_setting, pair_setting


@dataclass(frozen=True)
class RCSConfig:
    """Rare class sampling hyper-parameters (§4.2); a typo in the config fails here."""

    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


def _check_crop_fits(dataset: Any, resize: tuple[int, int], crop: tuple[int, int]) -> None:
    """A training crop larger than the resized images would train on padding: refuse it."""
    height, width = image_size(dataset.images[0])
    rh, rw = rescale_size(height, width, resize)
    if crop[0] > rh or crop[1] > rw:
        raise ConfigError(
            f"data.crop_size {list(crop)} is larger than the resized images of {dataset.root} "
            f"({width}x{height} -> {rw}x{rh} by the resize {list(resize)}); use a smaller crop "
            "or a larger resize"
        )


def _check_margins_fit(dataset: Any, margins: tuple[int, int, int, int]) -> None:
    """Margins covering a whole target image would zero every pseudo-label: refuse them."""
    height, width = image_size(dataset.images[0])
    top, bottom, left, right = margins
    if top + bottom >= height or left + right >= width:
        raise ConfigError(
            f"data.pseudo_margins {list(margins)} cover the whole {width}x{height} image of "
            f"{dataset.root}: no pseudo-label would count; lower them"
        )


class UDADataModule(LightningDataModule):
    """Source -> target data for UDA training and target validation (GTA5 -> Cityscapes by
    default; any two `DatasetFormat`s with the same classes).

    Train batch: ``src_img`` (B, 3, h, w) normalised, ``src_lbl`` (B, h, w) int64 (255 = ignore),
    ``tgt_img`` (B, 3, h, w) (absent with ``with_target=False``, for source-only runs),
    ``src_crop`` / ``tgt_crop`` (`CropRecord`s), ``index`` (B,) int64 sample indices (what makes
    resuming exact), and with ``pseudo_margins`` ``tgt_valid`` (B, h, w) float 0/1.
    Val/test batch (batch size 1): ``img`` (1, 3, h', w') at test scale, ``label`` (1, H, W)
    int64 at full resolution, ``path``, ``ori_size``.

    Args:
        source_root: source dataset root (prepared: train-id labels, RCS json files).
        target_root: target dataset root (train images; labelled ``val_split`` images).
        source_format, target_format: built-in dataset format names (gta5, cityscapes, synthia,
            acdc, acdc_flat, darkzurich) or paths of format YAMLs (`ssr.data.formats`).
        eval_subsets: extra means of class subsets reported beside mIoU: a name ("synthia":
            mIoU16, mIoU13) or {name: [train ids]}; None for none.
        source_resize, target_resize, test_resize: keep-ratio (long, short) scales (§4.1, §3.2);
            test_resize None keeps the val images' size.
        crop_size: (height, width) of both training crops.
        cat_max_ratio: source crop class-ratio limit (the target never uses one).
        rcs: rare class sampling parameters (``RCSConfig`` fields) or None for uniform sampling.
        val_split: target split used for validation and test.
        with_target: also load target training crops (False: source-only baseline).
        align_label_to_image: deviation from the reference, see ``FolderDataset`` (source).
        seed: seed of the training sample stream; None = ``torch.initial_seed()`` at setup.
        pseudo_margins: HRDA's valid-pseudo-label mask: [top, bottom, left, right] pixels of the
            full target image whose pseudo-labels get weight 0 ([30, 240, 30, 30]), delivered as
            ``tgt_valid``. Built at each image's file size, not HRDA's hard-coded 1024x2048
            (identical for native Cityscapes). Padding would be invalid (HRDA: 255); none occurs.
    """

    def __init__(
        self,
        source_root: str,
        target_root: str,
        source_resize: Sequence[int] = (1280, 720),
        target_resize: Sequence[int] = (1024, 512),
        crop_size: Sequence[int] = (512, 512),
        cat_max_ratio: float = 0.75,
        test_resize: Sequence[int] | None = (1024, 512),
        batch_size: int = 2,
        num_workers: int = 4,
        rcs: Mapping[str, float] | RCSConfig | None = None,
        val_split: str = "val",
        with_target: bool = True,
        align_label_to_image: bool = False,
        seed: int | None = None,
        pseudo_margins: Sequence[int] | None = None,
        source_format: str = "gta5",
        target_format: str = "cityscapes",
        eval_subsets: str | Mapping[str, Sequence[int]] | None = None,
    ):
        super().__init__()
        self.source_root, self.target_root = str(source_root), str(target_root)
        self.source_format, self.target_format = (
            load_format(source_format),
            load_format(target_format),
        )
        if self.source_format.classes != self.target_format.classes:
            raise ConfigError(
                f"data.source_format {self.source_format.name} and data.target_format "
                f"{self.target_format.name} declare different classes; both domains must be "
                "labelled with one class list"
            )
        self.classes: ClassSet = self.target_format.classes
        self.eval_subsets = resolve_eval_subsets(eval_subsets)
        self.source_resize = pair_setting(source_resize, "data.source_resize")
        self.target_resize = pair_setting(target_resize, "data.target_resize")
        self.crop_size = pair_setting(crop_size, "data.crop_size")
        self.test_resize = (
            None if test_resize is None else pair_setting(test_resize, "data.test_resize")
        )
        self.cat_max_ratio = cat_max_ratio
        self.batch_size = int_setting(batch_size, "data.batch_size", 1)
        self.num_workers = int_setting(num_workers, "data.num_workers", 0)
        self.rcs_config = rcs if isinstance(rcs, RCSConfig) or rcs is None else RCSConfig(**rcs)
        self.val_split, self.with_target = val_split, with_target
        self.align_label_to_image = align_label_to_image
        self.seed = seed
        self.pseudo_margins = pseudo_margins_setting(pseudo_margins, "data.pseudo_margins")
        self.next_index = 0
        self.rcs_sampler: RareClassSampler | None = None
        self.train_set: UDATrainDataset | None = None
        self.val_set: FolderDataset | None = None
        self._train_sampler: InfiniteIndexSampler | None = None
        self._consumed: int | None = None  # samples training has seen, from batch indices

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets; every layout problem surfaces here as a DatasetError, before any
        training (val pairs included: their headers are checked, not only at validation)."""
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build_train_set()
        if self.val_set is None:
            self.val_set = FolderDataset(
                self.target_root,
                self.target_format,
                self.val_split,
                test_transform(self.test_resize),
                label_fit="strict",  # scored at full resolution: a size mismatch would shift it
            )
            self.val_set.check_pairs()

    def _build_train_set(self) -> UDATrainDataset:
        source = FolderDataset(
            self.source_root,
            self.source_format,
            "train",
            source_train_transform(self.source_resize, self.crop_size, self.cat_max_ratio),
            label_fit="align" if self.align_label_to_image else None,
        )
        target = None
        if self.with_target:
            target = FolderDataset(
                self.target_root,
                self.target_format,
                "train",
                target_train_transform(self.target_resize, self.crop_size),
                label=False,
            )
        for dataset, resize, key in (
            (source, self.source_resize, "data.source_resize"),
            (target, self.target_resize, "data.target_resize"),
        ):
            if dataset is not None:
                check_resized(dataset.root, resize, key)  # a pre-resized copy: its own scale
                _check_crop_fits(dataset, resize, self.crop_size)
        if target is not None and self.pseudo_margins is not None:
            if (target.root / RESIZED_MARKER).is_file():
                raise ConfigError(
                    f"data.pseudo_margins are pixels of the full target images, but "
                    f"{target.root} is a pre-resized copy; train from the original target"
                )
            _check_margins_fit(target, self.pseudo_margins)
        if self.seed is None:
            self.seed = torch.initial_seed()  # the global seed after seed_everything
        if self.rcs_config is not None:
            self.rcs_sampler = RareClassSampler(
                self.source_root,
                temperature=self.rcs_config.temperature,
                min_pixels=self.rcs_config.min_pixels,
                min_crop_ratio=self.rcs_config.min_crop_ratio,
                available=source.label_index.keys(),
                seed=self.seed,
                dataset=self.source_format.source,
            )
        return UDATrainDataset(
            source, target, self.rcs_sampler, self.seed, pseudo_margins=self.pseudo_margins
        )

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            worker_init_fn=worker_init(rank),  # a stop signal is the main process's to handle
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # Own generator: creating an iterator then draws nothing from the global torch RNG,
            # whose stream (dropout, drop-path) a resumed run must continue exactly.
            generator=torch.Generator().manual_seed(self.seed or 0),
            **kwargs,
        )

    def describe(self) -> str:
        """Dataset sizes for the startup summary (after `setup`)."""
        ts = self.train_set
        parts = [] if ts is None else [f"{len(ts.source)} source"]
        if ts is not None and ts.target is not None:
            parts.append(f"{len(ts.target)} target train")
        if self.val_set is not None:
            parts.append(f"{len(self.val_set)} target {self.val_split}")
        return ", ".join(parts) + (", RCS" if self.rcs_sampler is not None else "")

    def _replica(self) -> tuple[int, int]:
        """(rank, world size) of this process: every rank reads its own share of the data."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        self._train_sampler = InfiniteIndexSampler(self._sync_next_index(), *self._replica())
        return self._loader(
            self.train_set, self.batch_size, sampler=self._train_sampler, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        rank, world = self._replica()
        # Under DDP rank r evaluates images r, r+W, ... (no padding, unlike DistributedSampler):
        # SegMetric sums the confusion matrices over ranks, so every image counts exactly once.
        dataset = (
            self.val_set
            if world == 1
            else Subset(self.val_set, range(rank, len(self.val_set), world))
        )
        return self._loader(dataset, 1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this in the main process for every batch it consumes."""
        if isinstance(batch, dict) and "index" in batch:
            # Global count: this rank's last index is (global position) - W + rank.
            rank, world = self._replica()
            self._consumed = int(batch["index"].max()) - rank + world
        return batch

    def _sync_next_index(self) -> int:
        if self._consumed is not None:
            self.next_index = self._consumed
        elif self._train_sampler is not None:  # iterated outside Lightning
            self.next_index = self._train_sampler.position
        return self.next_index

    def state_dict(self) -> dict[str, Any]:
        """Seed and next training sample index (plus the RCS generator state)."""
        state: dict[str, Any] = {"seed": self.seed, "next_index": self._sync_next_index()}
        if self.rcs_sampler is not None:
            state["rcs"] = self.rcs_sampler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training sample stream where the checkpoint left it."""
        self.seed = state_dict["seed"]
        self.next_index = int(state_dict["next_index"])
        self._consumed = None
        if self.train_set is not None and self.seed is not None:
            self.train_set.seed = self.seed
        if self._train_sampler is not None:
            self._train_sampler.position = self.next_index
        if self.rcs_sampler is not None and "rcs" in state_dict:
            self.rcs_sampler.load_state_dict(state_dict["rcs"])
