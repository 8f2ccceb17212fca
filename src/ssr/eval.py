"""Evaluation entry point: `python -m ssr.eval ckpt_path=... | pred_dir=...` (also `ssr-eval`).

The paper's protocol (docs/method.md §3.2, §8.4): the student (shadow branch, §3.3) under the test
protocol of the `inference` group (each val image resized to 1024x512 keeping its ratio, one
whole-image pass, logits upsampled to the input size and then to the label size), argmax,
dataset-level IoU against full-resolution train ids. `pred_dir` mode scores another codebase's
`*_trainIds.png` files against the same ground truth.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader

from ssr import CONF_PATH
from ssr.data.datasets import FolderDataset, TestTimeViews
from ssr.data.files import non_train_id, read_label
from ssr.data.formats import (
    DatasetFormat,
    check_num_classes,
    load_format,
    resolve_eval_subsets,
)
from ssr.data.workers import worker_init
from ssr.errors import UserError
from ssr.io import atomic_write_json, find_files
from ssr.metrics import SegMetric, iou_table
from ssr.model.checkpoint import load_segmentor
from ssr.model.inference import Inference
from ssr.run.cli import cli, resolve_device

log = logging.getLogger(__name__)

PRED_SUFFIX = "_trainIds.png"
# city_sequence_frame, e.g. frankfurt_000000_000294: what names one Cityscapes frame in every file.
_CS_STEM = re.compile(r"^(.+?_\d{6}_\d{6})(?:_|$)")


class EvalInputError(UserError, ValueError):
    """The command line names inputs that cannot be scored (both/neither source, missing files)."""


def evaluate(
    segmentor: nn.Module,
    dataset: FolderDataset,
    inference: Inference,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    subsets: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Score `segmentor` on a labelled `dataset` under the test protocol `inference` (its images
    are rebuilt at every test scale; labels stay at full resolution).

    Batch size 1, as in the paper, since val images may differ in size. Returns
    `SegMetric.compute()` plus `num_images`. The segmentor's train/eval mode is restored afterwards,
    so a training loop can call this for validation. `subsets`: class-subset means to report
    beside mIoU (`ssr.metrics.SegMetric`).
    """
    device = torch.device(device)
    metric = SegMetric(dataset.format.classes.names, subsets=subsets).to(device)
    views = TestTimeViews(dataset, inference)
    loader = DataLoader(
        views, batch_size=1, shuffle=False, num_workers=num_workers, worker_init_fn=worker_init()
    )
    was_training = segmentor.training
    segmentor.eval()
    batches = (
        track(loader, description="Evaluating", console=Console(stderr=True))
        if progress
        else loader
    )
    try:
        with torch.inference_mode():
            for batch in batches:
                imgs = [x.to(device, non_blocking=True) for x in batch["img"]]
                label = batch["label"].to(device, non_blocking=True)  # (1, H, W) original size
                ids, _ = inference.predict(segmentor, imgs, label.shape[-2:])
                metric.update(ids, label)
    finally:
        segmentor.train(was_training)
    return {**metric.compute(), "num_images": len(dataset)}


def evaluate_predictions(
    pred_dir: str | Path,
    gt_root: str | Path,
    split: str = "val",
    progress: bool = True,
    fmt: DatasetFormat | str = "cityscapes",
    subsets: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Score a folder of `*_trainIds.png` (searched recursively) against `gt_root`'s train ids.

    Files are matched by frame: the Cityscapes stem (`city_seq_frame`), else the label's name
    without the format's label suffix, so `frankfurt_000000_000294_leftImg8bit_trainIds.png`,
    `frankfurt_000000_000294_trainIds.png` and ACDC's `GOPR0475_frame_000041_rgb_anon_trainIds.png`
    (what ssr.predict writes) all match. Every ground-truth image needs a prediction; extra
    predictions are ignored.
    """
    fmt = fmt if isinstance(fmt, DatasetFormat) else load_format(fmt)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvalInputError(
            f"pred_dir {pred_dir} is not a directory; pass a folder of *_trainIds.png"
        )
    gts = _label_files(Path(gt_root), split, fmt)
    image_tail = fmt.image_suffix.rsplit(".", 1)[0]  # "_rgb_anon" of "_rgb_anon.png"; "" of ".png"
    preds: dict[str, Path] = {}
    for path in find_files(pred_dir, f"*{PRED_SUFFIX}"):
        stem = frame_stem(path.name, PRED_SUFFIX)
        stem = stem.removesuffix(image_tail) if image_tail else stem
        if stem in preds:
            raise EvalInputError(
                f"pred_dir holds two predictions for {stem}: {preds[stem]} and {path}"
            )
        preds[stem] = path
    missing = [stem for stem in gts if stem not in preds]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(gts)} ground-truth images have no *{PRED_SUFFIX} in "
            f"{pred_dir}, first {missing[0]}; predict the whole split (ssr-predict input=...)"
        )
    num_classes = fmt.classes.num_classes
    metric = SegMetric(fmt.classes.names, subsets=subsets)
    items = (
        track(gts.items(), description="Scoring", console=Console(stderr=True))
        if progress
        else gts.items()
    )
    for stem, gt_path in items:
        gt = read_label(gt_path, num_classes)
        pred = _read_prediction(preds[stem])
        if pred.shape != gt.shape:
            raise EvalInputError(
                f"{preds[stem]} is {pred.shape[::-1]} (W, H) but its ground truth {gt_path} is "
                f"{gt.shape[::-1]}: predictions must be single-channel train ids at label size"
            )
        value = non_train_id(pred, num_classes)
        if value is not None:
            raise EvalInputError(
                f"{preds[stem]} holds value {value}, not a train id "
                f"(0..{num_classes - 1} or 255): "
                "it looks like Cityscapes label ids; score *_trainIds.png predictions"
            )
        metric.update(
            torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64))
        )
    return {**metric.compute(), "num_images": len(gts)}


def frame_stem(name: str, suffix: str) -> str:
    """Cityscapes `city_seq_frame` of a file name; other names are kept whole minus `suffix`."""
    match = _CS_STEM.match(name)
    return match.group(1) if match else name.removesuffix(suffix)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate what `cfg` names, print the table and write `<output_dir>/metrics.json`."""
    if (cfg.ckpt_path is None) == (cfg.pred_dir is None):
        raise EvalInputError(
            "pass exactly one of ckpt_path=<checkpoint> or pred_dir=<folder of PNGs>"
        )
    fmt = load_format(cfg.dataset)
    subsets = resolve_eval_subsets(cfg.eval_subsets)
    where = f"{fmt.name} {cfg.split}"
    if cfg.pred_dir is not None:
        result = evaluate_predictions(
            cfg.pred_dir, cfg.gt_root, cfg.split, fmt=fmt, subsets=subsets
        )
        title = f"{Path(cfg.pred_dir).name}: {where}"
    else:
        inference: Inference = instantiate(cfg.inference)
        # The data first: a wrong gt_root should fail before a large checkpoint is read.
        dataset = FolderDataset(cfg.gt_root, fmt, cfg.split, label=True, label_fit="strict")
        device = resolve_device(cfg.device)
        segmentor, _, _ = load_segmentor(cfg.ckpt_path, cfg.model, device)
        check_num_classes(fmt, segmentor.num_classes)
        inference = inference.for_model(segmentor)  # HRDA models bring their own protocol
        log.info(f"Test protocol: {inference!r}")
        result = evaluate(
            segmentor, dataset, inference, device, num_workers=cfg.num_workers, subsets=subsets
        )
        title = f"{Path(cfg.ckpt_path).name}: {where}"
    Console().print(iou_table(result, title=title))
    out = Path(cfg.output_dir)
    atomic_write_json(out / "metrics.json", _finite(result))
    log.info(
        f"mIoU {result['mIoU']:.2f} over {result['num_images']} images of {cfg.gt_root} "
        f"({cfg.split}) -> {out / 'metrics.json'}"
    )
    return result


def _finite(result: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: a split with no valid pixel reports null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}


def _read_prediction(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as err:
        raise EvalInputError(f"cannot read prediction {path} ({err}); re-write it") from err


def _label_files(gt_root: Path, split: str, fmt: DatasetFormat) -> dict[str, Path]:
    """Frame stem -> train-id label of every label folder of `split`, sorted."""
    folders = [gt_root / d for d in fmt.split(split).labels or ()]
    if not folders:
        raise EvalInputError(f"split {split} of {fmt.name} has no labels; score a labelled split")
    suffix = fmt.label_suffix
    files = [p for folder in folders for p in find_files(folder, f"*{suffix}")]
    if not files:
        raise EvalInputError(
            f"no *{suffix} under {folders[0]}; point gt_root at a {fmt.name}-format root "
            f"(convert raw labels with `python -m ssr.data.prepare {fmt.source} ROOT`)"
        )
    return {frame_stem(p.name, suffix): p for p in files}


@hydra.main(config_path=CONF_PATH, config_name="eval", version_base="1.3")
@cli
def main(cfg: DictConfig) -> float:
    return run(cfg)["mIoU"]


if __name__ == "__main__":
    main()
