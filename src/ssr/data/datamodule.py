"""The UDA LightningDataModule: GTA5 source crops (RCS or uniform) + Cityscapes target crops.

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

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ssr.data.datasets import CityscapesDataset, GTA5Dataset, image_size
from ssr.data.rcs import RareClassSampler
from ssr.data.transforms import (
    margin_mask,
    pseudo_margins_setting,
    rescale_size,
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


def _seed_transform(transform: Any, seed: int) -> None:
    # One shared generator pair for the whole Compose, so crop and flip draw from one stream.
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


class CropRecord(NamedTuple):
    """Where a training crop comes from: its image and its box in the resized image.

    Batched, ``file`` is a list and ``box`` a (B, 5) tensor. SSR's SAM feature cache cuts each
    crop's features out of full-image maps with it.
    """

    file: str  # the image path relative to its dataset root
    box: torch.Tensor  # (5,) int64: resized height, resized width, top, left, flip (0/1)


class _CropRecorder:
    """Runs a training pipeline and keeps where its last call cropped and flipped."""

    def __init__(self, transform: Any):
        transform.save_applied_params = True  # albumentations records each call's parameters
        self.transform, self.box = transform, torch.zeros(5, dtype=torch.int64)

    def __call__(self, **data: Any) -> dict[str, Any]:
        out = self.transform(**data)
        applied = dict(out.pop("applied_transforms"))
        crop = applied["CatMaxRandomCrop"]
        (height, width), (top, _, left, _) = crop["shape"][:2], crop["crop_box"]
        flip = int("HorizontalFlip" in applied)
        self.box = torch.tensor([height, width, top, left, flip], dtype=torch.int64)
        return out


class UDATrainDataset(Dataset):
    """Training pairs of §4.1: {src_img, src_lbl, src_crop[, tgt_img, tgt_crop[, tgt_valid]],
    index}, a pure function of (seed, i); the crops are `CropRecord`s.

    With RCS the source crop is re-drawn (new crop and flip, same file) up to ``max_rcs_tries``
    times until it keeps enough pixels of the drawn class; the next draw is accepted unchecked.
    With ``pseudo_margins`` the target's `margin_mask` rides through the target pipeline as its
    ``mask``: the pipeline draws the same numbers with or without it, so the stream is unchanged.
    """

    def __init__(
        self,
        source: GTA5Dataset,
        target: CityscapesDataset | None,
        rcs: RareClassSampler | None,
        seed: int,
        max_rcs_tries: int = 10,
        pseudo_margins: tuple[int, int, int, int] | None = None,
    ):
        self.source, self.target, self.rcs = source, target, rcs
        self.seed = seed
        self.max_rcs_tries = max_rcs_tries
        self.pseudo_margins = pseudo_margins

    def __len__(self) -> int:
        # Nominal size, as the reference's |source|·|target|; the sampler ignores it.
        return len(self.source) * (len(self.target) if self.target is not None else 1)

    def draw(self, index: int) -> tuple[int, int | None, int | None, int, int]:
        """(source index, RCS class or None, target index or None, source seed, target seed)."""
        rng = np.random.default_rng([self.seed, index])
        if self.rcs is not None:
            class_id, name = self.rcs.sample(rng)
            src_index: int = self.source.label_index[name]
        else:
            class_id, src_index = None, int(rng.integers(len(self.source)))
        tgt_index = int(rng.integers(len(self.target))) if self.target is not None else None
        src_seed, tgt_seed = (int(s) for s in rng.integers(2**63, size=2))
        return src_index, class_id, tgt_index, src_seed, tgt_seed

    def __getitem__(self, index: int) -> dict[str, Any]:
        src_index, class_id, tgt_index, src_seed, tgt_seed = self.draw(index)
        image, label = self.source.read(src_index)
        _seed_transform(self.source.transform, src_seed)
        src_tf = _CropRecorder(self.source.transform)
        for attempt in range(self.max_rcs_tries + 1):
            src = self.source.make_item(src_index, image, label, src_tf)
            if class_id is None or attempt == self.max_rcs_tries:
                break
            assert self.rcs is not None
            if self.rcs.accepts(src["label"], class_id):
                break
        out = {
            "src_img": src["img"],
            "src_lbl": src["label"],
            "src_crop": CropRecord(_relative(self.source, src_index), src_tf.box),
            "index": torch.tensor(index),
        }
        if self.target is not None and tgt_index is not None:
            _seed_transform(self.target.transform, tgt_seed)
            tgt_image, _ = self.target.read(tgt_index)
            tgt_tf = _CropRecorder(self.target.transform)
            valid = None
            if self.pseudo_margins is not None:  # at the file's size, before the pipeline
                valid = margin_mask(*tgt_image.shape[:2], self.pseudo_margins)
            tgt = self.target.make_item(tgt_index, tgt_image, valid, tgt_tf)
            out["tgt_img"] = tgt["img"]
            out["tgt_crop"] = CropRecord(_relative(self.target, tgt_index), tgt_tf.box)
            if valid is not None:  # padding (255) would be invalid too; it never happens
                out["tgt_valid"] = tgt["label"].eq(1).float()
        return out


def _relative(dataset: GTA5Dataset | CityscapesDataset, index: int) -> str:
    return dataset.images[index].relative_to(dataset.root).as_posix()


class InfiniteIndexSampler(Sampler[int]):
    """Yields 0, 1, 2, ... from ``position`` forever; ``position`` is the resumable state.

    Under DDP, rank ``r`` of ``W`` yields ``position + r``, ``position + r + W``, ...: per-rank
    batches of ``B`` together hold exactly the samples of one single-process batch of ``B·W``.
    ``position`` always counts the whole (global) stream, so it is the same on every rank.
    It runs in the main process ahead of training by the loader's prefetch, so the datamodule
    prefers the consumed count it reads from the batches (see ``UDADataModule.state_dict``).
    """

    def __init__(self, position: int = 0, rank: int = 0, num_replicas: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"sampler rank {rank} must lie in [0, {num_replicas})")
        self.position, self.rank, self.num_replicas = position, rank, num_replicas

    def __iter__(self) -> Iterator[int]:
        while True:
            index = self.position + self.rank
            self.position += self.num_replicas
            yield index


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
    """GTA5 -> Cityscapes data for UDA training and Cityscapes validation.

    Train batch: ``src_img`` (B, 3, h, w) normalised, ``src_lbl`` (B, h, w) int64 (255 = ignore),
    ``tgt_img`` (B, 3, h, w) (absent with ``with_target=False``, for source-only runs),
    ``src_crop`` / ``tgt_crop`` (`CropRecord`s), ``index`` (B,) int64 sample indices (what makes
    resuming exact), and with ``pseudo_margins`` ``tgt_valid`` (B, h, w) float 0/1.
    Val/test batch (batch size 1): ``img`` (1, 3, h', w') at test scale, ``label`` (1, H, W)
    int64 at full resolution, ``path``, ``ori_size``.

    Args:
        source_root: GTA5 root (images/, labels/ with *_labelTrainIds.png, RCS json files).
        target_root: Cityscapes root (leftImg8bit/, gtFine/ with *_labelTrainIds.png).
        source_resize, target_resize, test_resize: keep-ratio (long, short) scales (§4.1, §3.2);
            test_resize None keeps the val images' size.
        crop_size: (height, width) of both training crops.
        cat_max_ratio: source crop class-ratio limit (the target never uses one).
        rcs: rare class sampling parameters (``RCSConfig`` fields) or None for uniform sampling.
        val_split: Cityscapes split used for validation and test.
        with_target: also load target training crops (False: source-only baseline).
        align_label_to_image: deviation from the reference, see ``GTA5Dataset``.
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
    ):
        super().__init__()
        self.source_root, self.target_root = str(source_root), str(target_root)
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
        self.val_set: CityscapesDataset | None = None
        self._train_sampler: InfiniteIndexSampler | None = None
        self._consumed: int | None = None  # samples training has seen, from batch indices

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets; every layout problem surfaces here as a DatasetError, before any
        training (val pairs included: their headers are checked, not only at validation)."""
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build_train_set()
        if self.val_set is None:
            self.val_set = CityscapesDataset(
                self.target_root, self.val_split, test_transform(self.test_resize), label=True
            )
            self.val_set.check_pairs()

    def _build_train_set(self) -> UDATrainDataset:
        source = GTA5Dataset(
            self.source_root,
            source_train_transform(self.source_resize, self.crop_size, self.cat_max_ratio),
            align_label_to_image=self.align_label_to_image,
        )
        target = None
        if self.with_target:
            target = CityscapesDataset(
                self.target_root,
                "train",
                target_train_transform(self.target_resize, self.crop_size),
                label=False,
            )
        for dataset, resize in ((source, self.source_resize), (target, self.target_resize)):
            if dataset is not None:
                _check_crop_fits(dataset, resize, self.crop_size)
        if target is not None and self.pseudo_margins is not None:
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
