"""SegMetric against hand-computed confusion matrices and the real Cityscapes fixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from ssr.data.labels import CLASSES, NUM_CLASSES, label_ids_to_train_ids
from ssr.metrics import SegMetric, iou_table

ABC = ("a", "b", "c")
FRAME = "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_"


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_golden_numbers_by_hand() -> None:
    # Valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); the two gt=255 pixels are ignored
    # whatever is predicted there.
    # a: tp 1, gt 2, pred 2 -> union 3; b: tp 2, gt 2, pred 3 -> 3; c: tp 1, gt 2, pred 1 -> 2.
    target = _t([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = _t([[0, 1, 1, 1], [2, 0, 0, 255]])
    metric = SegMetric(class_names=ABC)
    metric.update(preds, target)
    result = metric.compute()
    assert result["IoU"]["a"] == pytest.approx(100 / 3)
    assert result["IoU"]["b"] == pytest.approx(200 / 3)
    assert result["IoU"]["c"] == pytest.approx(50.0)
    assert result["mIoU"] == pytest.approx(50.0)
    assert result["aAcc"] == pytest.approx(400 / 6)


def test_non_class_prediction_is_a_miss_and_empty_union_is_none() -> None:
    target = _t([[0, 0, 1, 1]])
    metric = SegMetric(class_names=ABC)
    metric.update(_t([[0, 255, 1, 1]]), target)
    result = metric.compute()
    assert result["IoU"]["a"] == pytest.approx(
        50.0
    )  # the 255 is a missed "a", not an ignored pixel
    assert result["IoU"]["b"] == pytest.approx(100.0)
    assert result["IoU"]["c"] is None  # never in gt, never predicted
    assert result["mIoU"] == pytest.approx(75.0)  # mean over a and b only
    assert result["aAcc"] == pytest.approx(75.0)
    # Any non-class value behaves like 255; it is nobody's false positive.
    for bad in (-1, 3, 19):
        other = SegMetric(class_names=ABC)
        other.update(_t([[0, bad, 1, 1]]), target)
        assert other.compute() == result


def test_accumulation_equals_one_big_update_and_merges_like_ddp() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, NUM_CLASSES, (4, 16, 24), generator=gen)
    target[:, :3] = 255
    preds = torch.where(
        torch.rand(target.shape, generator=gen) < 0.6,
        target,
        torch.randint(0, NUM_CLASSES, target.shape, generator=gen),
    )
    whole = SegMetric()
    whole.update(preds, target)
    parts = SegMetric()
    for i in range(4):
        parts.update(preds[i : i + 1], target[i : i + 1])
    assert torch.equal(parts.confmat, whole.confmat)
    assert parts.compute() == whole.compute()
    # Two ranks' states are summed (dist_reduce_fx="sum"), which merge_state reproduces locally.
    rank0, rank1 = SegMetric(), SegMetric()
    rank0.update(preds[:2], target[:2])
    rank1.update(preds[2:], target[2:])
    rank0.merge_state(rank1)
    assert torch.equal(rank0.confmat, whole.confmat)
    # Dataset-level accumulation is not the mean of per-image mIoUs.
    per_image = []
    for i in range(4):
        m = SegMetric()
        m.update(preds[i], target[i])
        per_image.append(m.compute()["mIoU"])
    assert whole.compute()["mIoU"] != pytest.approx(sum(per_image) / 4, abs=1e-9)


def test_bad_inputs_raise_one_clear_error() -> None:
    metric = SegMetric()
    with pytest.raises(ValueError, match="shape"):
        metric.update(
            torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="labelTrainIds"):
        metric.update(_t([[0, 1]]), _t([[0, 33]]))  # a Cityscapes label id, not a train id
    with pytest.raises(ValueError, match="argmax"):
        metric.update(torch.zeros(2, 2), _t([[0, 1], [1, 0]]))
    assert math.isnan(metric.compute()["mIoU"])  # nothing was accumulated


def test_real_cityscapes_fixture(shared_fixtures) -> None:
    train_ids = np.asarray(Image.open(shared_fixtures / f"{FRAME}labelTrainIds.png"))
    label_ids = np.asarray(Image.open(shared_fixtures / f"{FRAME}labelIds.png"))
    gt = torch.from_numpy(train_ids.astype(np.int64))
    present = sorted(int(v) for v in np.unique(train_ids) if v != 255)

    same = SegMetric()
    same.update(gt, gt)
    result = same.compute()
    assert result["mIoU"] == pytest.approx(100.0)
    assert result["aAcc"] == pytest.approx(100.0)
    assert [CLASSES.index(n) for n, v in result["IoU"].items() if v is not None] == present

    mapped = SegMetric()
    mapped.update(torch.from_numpy(label_ids_to_train_ids(label_ids).astype(np.int64)), gt)
    result = mapped.compute()
    # The two files were downscaled independently and differ on 77 of 32,768 pixels.
    assert 95.0 < result["mIoU"] < 100.0
    assert 99.5 < result["aAcc"] < 100.0


def test_iou_table_renders_every_class_and_the_summary() -> None:
    metric = SegMetric(class_names=ABC)
    metric.update(_t([[0, 255, 1, 1]]), _t([[0, 0, 1, 1]]))
    console = Console(record=True, width=80)
    console.print(iou_table(metric.compute(), title="demo"))
    text = console.export_text()
    for expected in ("demo", "a", "50.00", "100.00", "—", "mIoU", "75.00", "aAcc"):
        assert expected in text
