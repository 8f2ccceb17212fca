"""SegMetric against hand-computed confusion matrices and the real Cityscapes fixture."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console

from ssr.data.labels import CLASSES, NUM_CLASSES, SYNTHIA_EVAL_SUBSETS, label_ids_to_train_ids
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


# ------------------------------------------------------------------ class subsets (mIoU16, mIoU13)
def _pixels(pairs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds, target) as 1-D maps from (gt, pred, count) triples."""
    target = [gt for gt, _, n in pairs for _ in range(n)]
    preds = [pred for _, pred, n in pairs for _ in range(n)]
    return torch.tensor(preds), torch.tensor(target)


def test_synthia_subsets_by_hand_with_an_empty_union_left_out() -> None:
    # (gt, pred, pixels): road 0, sidewalk 1, fence 4, terrain 9, car 13, truck 14; wall 3 and the
    # rest never occur and are never predicted (empty union).
    preds, target = _pixels(
        [(0, 0, 3), (0, 1, 1), (1, 1, 2), (4, 4, 1), (4, 0, 1), (9, 9, 2), (14, 13, 1)]
    )
    metric = SegMetric(subsets=SYNTHIA_EVAL_SUBSETS)
    metric.update(preds, target)
    result = metric.compute()
    # By hand, IoU = tp / (gt + pred - tp):
    #   road:     tp 3, gt 4, pred 3 + 1 (fence) = 4 -> 3 / 5 = 60
    #   sidewalk: tp 2, gt 2, pred 2 + 1 (road)  = 3 -> 2 / 3 = 66.67
    #   fence:    tp 1, gt 2, pred 1             -> 1 / 2 = 50
    #   terrain:  tp 2, gt 2, pred 2             -> 100
    #   car:      tp 0, gt 0, pred 1 (truck)     -> 0;  truck: tp 0, gt 1, pred 0 -> 0
    iou = result["IoU"]
    assert iou["road"] == pytest.approx(60.0) and iou["sidewalk"] == pytest.approx(200 / 3)
    assert iou["wall"] is None and iou["terrain"] == pytest.approx(100.0)
    # mIoU19 over the 6 present: (60 + 66.67 + 50 + 100 + 0 + 0) / 6 = 830 / 18 = 46.11
    assert result["mIoU"] == pytest.approx(830 / 18)
    # mIoU16 (no terrain, truck, train): road, sidewalk, fence, car; wall left out, not a 0:
    #   (60 + 200/3 + 50 + 0) / 4 = (530/3) / 4 = 44.17   (with wall as 0: / 5 = 35.33)
    assert result["mIoU16"] == pytest.approx(530 / 12)
    # mIoU13 (no wall, fence, pole either): road, sidewalk, car: (60 + 200/3 + 0) / 3 = 42.22
    assert result["mIoU13"] == pytest.approx(380 / 9)
    assert result["aAcc"] == pytest.approx(800 / 11)  # 3 + 2 + 1 + 2 correct of 11
    # Subset means right after mIoU, in the order the subsets were given.
    assert list(result) == ["mIoU", "mIoU16", "mIoU13", "IoU", "aAcc"]


def test_miou16_is_not_miou19_rescaled_when_terrain_is_right() -> None:
    # Two gt pixels per class: wall, fence, pole get one right and one 255 (a miss) -> IoU 1/2;
    # truck and train get both 255 -> IoU 0; the other 14 classes (terrain too) -> 100.
    pairs = []
    for k in range(NUM_CLASSES):
        if k in (3, 4, 5):
            pairs += [(k, k, 1), (k, 255, 1)]
        elif k in (14, 16):
            pairs += [(k, 255, 2)]
        else:
            pairs += [(k, k, 2)]
    preds, target = _pixels(pairs)
    metric = SegMetric(subsets=SYNTHIA_EVAL_SUBSETS)
    metric.update(preds, target)
    result = metric.compute()
    # mIoU19 = (14 * 100 + 3 * 50 + 2 * 0) / 19 = 1550 / 19 = 81.58
    assert result["mIoU"] == pytest.approx(1550 / 19)
    # mIoU16 = (13 * 100 + 3 * 50) / 16 = 1450 / 16 = 90.625, while mIoU19 * 19/16 = 1550 / 16
    # = 96.875: the rescaling keeps terrain's 100, which SYNTHIA's 16 classes do not have.
    assert result["mIoU16"] == pytest.approx(90.625)
    assert result["mIoU"] * 19 / 16 == pytest.approx(96.875)
    # mIoU13 = 13 * 100 / 13 = 100 (wall, fence, pole, the only imperfect subset classes, are out)
    assert result["mIoU13"] == pytest.approx(100.0)


def test_subset_with_no_present_class_is_nan_and_no_subsets_adds_no_key() -> None:
    metric = SegMetric(class_names=ABC, subsets={"mIoUab": (0, 1), "mIoUc": [2]})
    assert metric.subsets == {"mIoUab": (0, 1), "mIoUc": (2,)}
    metric.update(_t([[0, 255, 1, 1]]), _t([[0, 0, 1, 1]]))
    result = metric.compute()
    assert result["mIoUab"] == pytest.approx(75.0)  # a 50, b 100
    assert math.isnan(result["mIoUc"])  # c: empty union, nothing to average (the mIoU rule)
    plain = SegMetric(class_names=ABC)
    assert plain.subsets == {}
    plain.update(_t([[0, 255, 1, 1]]), _t([[0, 0, 1, 1]]))
    assert list(plain.compute()) == ["mIoU", "IoU", "aAcc"]


@pytest.mark.parametrize(
    ("subsets", "message"),
    [
        ({"mIoU16": []}, "is empty"),
        ({"mIoU16": [0, 19]}, "19 is not a class index in 0..18"),
        ({"mIoU16": [-1]}, "-1 is not a class index"),
        ({"mIoU16": [True]}, "True is not a class index"),
        ({"mIoU16": [1.0]}, "1.0 is not a class index"),
        ({"mIoU16": [0, 1, 0]}, "lists class 0 twice"),
        ({"mIoU16": "0,1"}, "expected a list of class indices"),
        ({"mIoU": [0]}, "not one of"),
        ({"IoU": [0]}, "not one of"),
        ({"aAcc": [0]}, "not one of"),
        ({"num_images": [0]}, "not one of"),
        ({"road": [0]}, "use 'mIoU' plus"),
        ({"mIoU/16": [0]}, "use 'mIoU' plus"),
        ([("mIoU16", [0])], "must map a name"),
    ],
)
def test_bad_subsets_raise_one_line_at_construction(subsets, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        SegMetric(subsets=subsets)
    assert "\n" not in str(err.value)


def test_subsets_from_a_hydra_config_and_numpy_ints() -> None:
    cfg = OmegaConf.create({"subsets": {k: list(v) for k, v in SYNTHIA_EVAL_SUBSETS.items()}})
    assert SegMetric(subsets=cfg.subsets).subsets == SYNTHIA_EVAL_SUBSETS
    assert SegMetric(subsets={"mIoU2": [np.int64(1)]}).subsets == {"mIoU2": (1,)}


def test_iou_table_shows_subset_rows_after_miou() -> None:
    metric = SegMetric(class_names=ABC, subsets={"mIoUab": (0, 1), "mIoUc": (2,)})
    metric.update(_t([[0, 255, 1, 1]]), _t([[0, 0, 1, 1]]))
    result = metric.compute()
    console = Console(record=True, width=80)
    console.print(iou_table(result))
    lines = [line for line in console.export_text().splitlines() if "│" in line]
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in lines]
    assert rows[-4:] == [
        ["mIoU", "75.00"],
        ["mIoUab", "75.00"],
        ["mIoUc", "nan"],
        ["aAcc", "75.00"],
    ]
    # Read back from metrics.json, where ssr.eval._finite made the NaN a null: shown as "—".
    console = Console(record=True, width=80)
    console.print(iou_table(json.loads(json.dumps({**result, "mIoUc": None}))))
    assert re.search(r"mIoUc\s+│\s+—", console.export_text())


def test_log_metric_logs_the_subset_means() -> None:
    from ssr.uda.module import UDAModule

    logged: dict[str, float] = {}
    module = SimpleNamespace(log_dict=lambda logs, **_: logged.update(logs))
    metric = SegMetric(subsets=SYNTHIA_EVAL_SUBSETS)
    metric.update(*_pixels([(0, 0, 3), (0, 1, 1), (1, 1, 2), (9, 9, 2)]))
    result = UDAModule._log_metric(module, "val", metric)  # type: ignore[arg-type]
    assert logged["val/mIoU16"] == result["mIoU16"] and logged["val/mIoU13"] == result["mIoU13"]
    assert {"val/mIoU", "val/aAcc", "val/IoU/road", "val/IoU/terrain"} <= set(logged)
    assert "val/IoU/wall" not in logged  # empty union, as before
    assert not metric.confmat.any()  # reset for the next epoch
