"""The training sample stream: sample ``i`` is a pure function of (seed, i), read in any order.

`UDATrainDataset` draws the source file (RCS or uniform), the target file and the augmentation
seeds of sample ``i`` from ``np.random.default_rng([seed, i])``; `InfiniteIndexSampler` yields the
indices from a resumable position (docs/method.md §4.1, §4.2).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ssr.data.datasets import FolderDataset
from ssr.data.rcs import RareClassSampler
from ssr.data.transforms import margin_mask


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
        source: FolderDataset,
        target: FolderDataset | None,
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


def _relative(dataset: FolderDataset, index: int) -> str:
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
