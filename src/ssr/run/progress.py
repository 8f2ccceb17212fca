"""The training progress bar: optimiser steps out of `max_steps`, ETA, and the main losses."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich bar counted in optimiser steps up to `max_steps` (ETA, it/s, losses).

    Training is one endless epoch over an infinite sampler, so the epoch length Lightning sees is
    nominal; the bar uses `max_steps` instead and drops the `train/` prefix and `v_num`.
    """

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        max_steps = self.trainer.max_steps
        return min(total, max_steps) if max_steps > 0 else total

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"

    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k.removeprefix("train/"): v for k, v in items.items()}
