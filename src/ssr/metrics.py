"""Dataset-level semantic segmentation metric: per-class IoU, mIoU and pixel accuracy.

docs/method.md §3.2 and §8.4: intersection and union are accumulated over the whole split at full
resolution (not averaged per image), ground-truth 255 is ignored, and mIoU is the mean over the
classes whose union is non-empty (mmseg's nan-mean, the official Cityscapes evaluator's rule).

Benchmarks whose source lacks some classes report means over class subsets beside it (SYNTHIA ->
Cityscapes: mIoU16 and mIoU13, ``ssr.data.labels.SYNTHIA_EVAL_SUBSETS``). ``SegMetric(subsets=...)``
computes each one directly as the same nan-mean over the subset's per-class IoUs: the rescaled
19-class mean (mIoU19 * 19 / 16) only equals it when all 19 classes are present and the three
outside the subset (terrain, truck, train: never in SYNTHIA, yet predicted on Cityscapes) score 0.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch
from rich.table import Table
from torchmetrics import Metric

from ssr.data.labels import CLASSES, IGNORE_INDEX, SUBSET_KEY

SegResult: TypeAlias = dict[str, Any]
"""``SegMetric.compute()``: percentages under fixed keys plus one key per class subset.

- ``"mIoU"`` (float): mean over the classes with a non-empty union, NaN if there are none;
- one ``"mIoU<suffix>"`` float per subset (e.g. ``"mIoU16"``), same rule over the subset's classes,
  in the order the subsets were given, right after ``"mIoU"``;
- ``"IoU"`` (dict[str, float | None]): per class, None for an empty union (absent, never predicted);
- ``"aAcc"`` (float): pixel accuracy, NaN with no valid pixel.

A plain dict rather than a TypedDict because the subset keys are chosen at run time; callers add
more (``"num_images"``). ``subset_keys`` lists the subset keys of any such dict.
"""


RESERVED_KEYS = frozenset({"mIoU", "IoU", "aAcc", "num_images"})


def subset_keys(result: Mapping[str, Any]) -> list[str]:
    """The class-subset means in ``result`` (a ``compute()`` dict, maybe from JSON), in order."""
    return [k for k in result if SUBSET_KEY.fullmatch(k)]


def _check_subsets(
    subsets: Mapping[str, Sequence[int]] | None, num_classes: int
) -> dict[str, tuple[int, ...]]:
    """``subsets`` as {name: class indices}, or a one-line ValueError naming what is wrong."""
    if subsets is None:
        return {}
    if not isinstance(subsets, Mapping):
        raise ValueError(
            f"subsets must map a name to class indices, e.g. {{'mIoU16': [0, 1, ...]}}, "
            f"not {type(subsets).__name__}"
        )
    checked: dict[str, tuple[int, ...]] = {}
    for name, indices in subsets.items():
        if not isinstance(name, str) or name in RESERVED_KEYS or not SUBSET_KEY.fullmatch(name):
            raise ValueError(
                f"class subset name {name!r}: use 'mIoU' plus letters, digits or _ (e.g. "
                f"'mIoU16'), not one of {sorted(RESERVED_KEYS)}"
            )
        if isinstance(indices, str | bytes) or not isinstance(indices, Sequence):
            raise ValueError(
                f"class subset {name}: expected a list of class indices, not {indices!r}"
            )
        if not indices:
            raise ValueError(f"class subset {name} is empty: list at least one class index")
        values: list[int] = []
        for i in indices:
            try:
                index = None if isinstance(i, bool) else operator.index(i)  # int, numpy int
            except TypeError:
                index = None
            if index is None or not 0 <= index < num_classes:
                raise ValueError(
                    f"class subset {name}: {i!r} is not a class index in 0..{num_classes - 1}"
                )
            values.append(index)
        if len(set(values)) != len(values):
            dup = next(i for i in values if values.count(i) > 1)
            raise ValueError(f"class subset {name} lists class {dup} twice")
        checked[name] = tuple(values)
    return checked


class SegMetric(Metric):
    """Confusion matrix of ground truth (rows) x prediction (columns), summed across processes.

    The matrix has one extra column, "other": a prediction outside ``0..C-1`` (e.g. 255) where the
    ground truth is a valid class lands there, so it counts as a miss for the true class and as a
    false positive for no class, as in the official Cityscapes evaluator.

    ``subsets`` ({name: class indices}, names "mIoU<suffix>") adds one mean per subset to
    ``compute()``; they are checked here, so a bad definition fails before any evaluation, and
    kept, copied, as ``self.subsets`` (in order) for whoever logs the result.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confmat: torch.Tensor

    def __init__(
        self,
        class_names: Sequence[str] = CLASSES,
        ignore_index: int = IGNORE_INDEX,
        subsets: Mapping[str, Sequence[int]] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.subsets = _check_subsets(subsets, self.num_classes)
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
        """Percentages; a class with an empty union gets IoU None and is left out of every mean.

        A subset mean is NaN, like mIoU, when none of its classes has a non-empty union.
        """
        conf = self.confmat.double()
        c = self.num_classes
        tp = conf.diagonal()  # the diagonal of the (C, C+1) matrix never touches "other"
        gt_total = conf.sum(dim=1)  # includes the "other" column: those pixels are misses
        pred_total = conf[:, :c].sum(dim=0)
        union = gt_total + pred_total - tp
        per_class = [100.0 * float(tp[i] / union[i]) if union[i] > 0 else None for i in range(c)]
        total = float(conf.sum())
        result: SegResult = {"mIoU": _nan_mean(per_class)}
        for name, indices in self.subsets.items():
            result[name] = _nan_mean([per_class[i] for i in indices])
        result["IoU"] = dict(zip(self.class_names, per_class, strict=True))
        result["aAcc"] = 100.0 * float(tp.sum()) / total if total > 0 else float("nan")
        return result


def _nan_mean(values: Sequence[float | None]) -> float:
    """Mean of the values that are not None (classes with a non-empty union); NaN if none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


def iou_table(result: SegResult, title: str = "Per-class IoU (%)") -> Table:
    """A rich table of ``SegMetric.compute()``: one row per class, then mIoU, the class-subset
    means (bold like mIoU: for SYNTHIA -> Cityscapes they are the headline numbers) and aAcc.

    The subsets are found by key (``subset_keys``), so a result read back from ``metrics.json``,
    where NaN became None, renders too ("—").
    """
    table = Table(title=title, min_width=48)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in result["IoU"].items():
        table.add_row(name, "—" if value is None else f"{value:.2f}")
    table.add_section()
    table.add_row("[bold]mIoU[/bold]", f"[bold]{_pct(result['mIoU'])}[/bold]")
    for key in subset_keys(result):
        table.add_row(f"[bold]{key}[/bold]", f"[bold]{_pct(result[key])}[/bold]")
    table.add_row("aAcc", _pct(result["aAcc"]))
    return table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
