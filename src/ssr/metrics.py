"""Dataset-level semantic segmentation metric: per-class IoU, mIoU and pixel accuracy.

docs/method.md §3.2 and §8.4: intersection and union are accumulated over the whole split at full
resolution (not averaged per image), ground-truth 255 is ignored, and mIoU is the mean over the
classes whose union is non-empty (mmseg's nan-mean, the official Cityscapes evaluator's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from rich.table import Table
from torchmetrics import Metric

from ssr.data.labels import CLASSES, IGNORE_INDEX


class SegResult(TypedDict):
    """Percentages; ``IoU`` is None for a class with an empty union (absent, never predicted)."""

    mIoU: float
    IoU: dict[str, float | None]
    aAcc: float


class SegMetric(Metric):
    """Confusion matrix of ground truth (rows) x prediction (columns), summed across processes.

    The matrix has one extra column, "other": a prediction outside ``0..C-1`` (e.g. 255) where the
    ground truth is a valid class lands there, so it counts as a miss for the true class and as a
    false positive for no class, as in the official Cityscapes evaluator.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confmat: torch.Tensor

    def __init__(
        self,
        class_names: Sequence[str] = CLASSES,
        ignore_index: int = IGNORE_INDEX,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        c = self.num_classes
        self.add_state(
            "confmat", default=torch.zeros(c, c + 1, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            preds: integer class map, any shape (e.g. (B, H, W)); non-class values count as misses.
            target: integer ground truth, same shape, values in ``0..C-1`` or ``ignore_index``.
        """
        if preds.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(preds.shape)} != ground-truth shape "
                f"{tuple(target.shape)}: resize logits to the label size before the argmax"
            )
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("SegMetric.update takes integer class maps: pass logits.argmax(1)")
        c = self.num_classes
        target = target.reshape(-1).long()
        preds = preds.reshape(-1).long()
        valid = target != self.ignore_index
        target, preds = target[valid], preds[valid]
        bad = (target < 0) | (target >= c)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(
                f"ground truth holds value {value}, outside 0..{c - 1} and {self.ignore_index}: "
                "use train-id labels (*_labelTrainIds.png), not Cityscapes label ids"
            )
        preds = torch.where((preds >= 0) & (preds < c), preds, c)  # c = the "other" column
        counts = torch.bincount(target * (c + 1) + preds, minlength=c * (c + 1))
        self.confmat += counts.reshape(c, c + 1)

    def compute(self) -> SegResult:
        """Percentages; a class with an empty union gets IoU None and is left out of the mean."""
        conf = self.confmat.double()
        c = self.num_classes
        tp = conf.diagonal()  # the diagonal of the (C, C+1) matrix never touches "other"
        gt_total = conf.sum(dim=1)  # includes the "other" column: those pixels are misses
        pred_total = conf[:, :c].sum(dim=0)
        union = gt_total + pred_total - tp
        iou = {
            name: (100.0 * float(tp[i] / union[i]) if union[i] > 0 else None)
            for i, name in enumerate(self.class_names)
        }
        present = [v for v in iou.values() if v is not None]
        total = float(conf.sum())
        return {
            "mIoU": sum(present) / len(present) if present else float("nan"),
            "IoU": iou,
            "aAcc": 100.0 * float(tp.sum()) / total if total > 0 else float("nan"),
        }


def iou_table(result: SegResult, title: str = "Per-class IoU (%)") -> Table:
    """A rich table of ``SegMetric.compute()``: one row per class, then mIoU and aAcc."""
    table = Table(title=title, min_width=48)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in result["IoU"].items():
        table.add_row(name, "—" if value is None else f"{value:.2f}")
    table.add_section()
    table.add_row("[bold]mIoU[/bold]", f"[bold]{result['mIoU']:.2f}[/bold]")
    table.add_row("aAcc", f"{result['aAcc']:.2f}")
    return table
