"""Debug image panels and per-class IoU plots, drawn outside the training step.

`DebugImages` asks the UDA module to stash detached copies of the tensors its step already computes
(images, labels, predictions, pseudo-labels, mixed and masked images, the SSR fusion's change per
stage; docs/method.md §4.5-§4.6, §5, §6.6) on the steps it draws, and renders them here with PIL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ssr.data.labels import CLASSES, MEAN, PALETTE, STD, colorize
from ssr.errors import ConfigError
from ssr.run.wandb import wandb_loggers

# ------------------------------------------------------------------ tile grids (PIL + numpy)
PAD = 4  # pixels between tiles and around the grid
TITLE_H = 18  # pixels of the title strip above each tile
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)


class Tile(NamedTuple):
    title: str
    pixels: np.ndarray  # (H, W, 3) uint8
    photo: bool = False  # resized bilinearly (images) rather than nearest (label / heat maps)


# Viridis sampled at 0, .25, .5, .75, 1: perceptually ordered, readable in grey-scale print.
_VIRIDIS = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64
)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def image_rgb(img: Tensor) -> np.ndarray:
    """(3, H, W) normalised network input -> (H, W, 3) uint8 RGB (undoes MEAN/STD)."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    rgb = (img.float() * std + mean).clamp(0, 255).round().byte()
    return rgb.permute(1, 2, 0).numpy()


def label_rgb(label: Tensor) -> np.ndarray:
    """(H, W) train ids -> Cityscapes colours; 255 (ignore) is black."""
    return colorize(label.cpu().numpy())


def heat_rgb(values: Tensor, vmax: float, vmin: float = 0.0) -> np.ndarray:
    """(H, W) floats -> viridis colours over [vmin, vmax]."""
    span = max(vmax - vmin, 1e-12)
    t = ((values.float().numpy() - vmin) / span).clip(0.0, 1.0) * (len(_VIRIDIS) - 1)
    stops = np.arange(len(_VIRIDIS))
    channels = [np.interp(t, stops, _VIRIDIS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def tile_box(row: int, col: int, tile_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image area of tile (row, col) in a grid."""
    th, tw = tile_hw
    left = PAD + col * (tw + PAD)
    top = PAD + row * (TITLE_H + th + PAD) + TITLE_H
    return left, top, left + tw, top + th


def grid_size(rows: int, cols: int, tile_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a grid of `rows` x `cols` titled tiles."""
    th, tw = tile_hw
    return PAD + cols * (tw + PAD), PAD + rows * (TITLE_H + th + PAD)


def render_grid(rows: Sequence[Sequence[Tile]], tile_hw: tuple[int, int]) -> Image.Image:
    """Titled tiles, one list per grid row; shorter rows leave background on the right.

    Label and heat maps are resized with nearest neighbour, so their true resolution stays visible
    (a stride-4 prediction, a stride-32 fusion map's token grid).
    """
    th, tw = tile_hw
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", grid_size(len(rows), cols, tile_hw), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            left, top, _, _ = tile_box(r, c, tile_hw)
            resample = Image.Resampling.BILINEAR if tile.photo else Image.Resampling.NEAREST
            canvas.paste(Image.fromarray(tile.pixels).resize((tw, th), resample), (left, top))
            title = _fit(tile.title, tw - 2, font)
            draw.text((left + 1, top - TITLE_H + 2), title, fill=TEXT, font=font)
    return canvas


def panel_rows(debug: Mapping[str, Tensor], i: int) -> list[list[Tile]]:
    """The grid rows of sample `i` from what `UDAModule` stashed (keys: see `UDAModule._stash`)."""
    d = debug
    rows = [
        [
            Tile(f"#{i} source", image_rgb(d["src_img"][i]), photo=True),
            Tile("source label", label_rgb(d["src_lbl"][i])),
            Tile("source pred", label_rgb(d["src_pred"][i])),
        ]
    ]
    if "tgt_img" in d:
        q = float(d["pl_w"][i].max())
        rows.append(
            [
                Tile(f"#{i} target", image_rgb(d["tgt_img"][i]), photo=True),
                Tile("pseudo-label", label_rgb(d["pl_lbl"][i])),
                Tile(f"PL confidence, q={q:.2f}", heat_rgb(d["pl_conf"][i], vmax=1.0)),
            ]
        )
        rows.append(
            [
                Tile(f"#{i} mixed", image_rgb(d["mix_img"][i]), photo=True),
                Tile("mixed label", label_rgb(d["mix_lbl"][i])),
                Tile("mixed pred", label_rgb(d["mix_pred"][i])),
            ]
        )
    if "mic_img" in d:
        rows.append(
            [
                Tile(f"#{i} MIC masked target", image_rgb(d["mic_img"][i]), photo=True),
                Tile("MIC pred", label_rgb(d["mic_pred"][i])),
            ]
        )
    stages = sorted(int(k.rsplit("_", 1)[1]) for k in d if k.startswith("ssr_delta_"))
    if stages:
        row = []
        for s in stages:
            delta = d[f"ssr_delta_{s}"][i]  # (H_s, W_s): ||fused - plain|| over channels
            lo, hi = float(delta.min()), float(delta.max())  # min-max: the spatial pattern shows
            row.append(Tile(f"SSR stage {s}: {lo:.3g}-{hi:.3g}", heat_rgb(delta, hi, vmin=lo)))
        rows.append(row)
    return rows


def debug_panel(debug: Mapping[str, Tensor], max_images: int, tile_size: int) -> Image.Image:
    """Every row of the first `max_images` samples in one grid; tiles keep the crop's aspect."""
    h, w = debug["src_img"].shape[-2:]
    tile_hw = (tile_size, max(1, round(tile_size * w / h)))
    n = min(max_images, debug["src_img"].shape[0])
    rows = [row for i in range(n) for row in panel_rows(debug, i)]
    return render_grid(rows, tile_hw)


def bar_chart(
    values: Mapping[str, float | None],
    title: str,
    colours: Mapping[str, tuple[int, int, int]] | None = None,
) -> Image.Image:
    """Horizontal bars of percentages (0–100), one row per name; None is drawn as n/a."""
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font()
    name_w = max([110] + [round(draw.textlength(n, font=font)) + 8 for n in values])
    bar_w, value_w, row_h = 360, 50, 20
    width = PAD + name_w + bar_w + value_w + PAD
    height = 2 * PAD + TITLE_H + row_h * len(values)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill=TEXT, font=font)
    for k, (name, value) in enumerate(values.items()):
        top = 2 * PAD + TITLE_H + k * row_h
        draw.text((PAD, top + 3), name, fill=TEXT, font=font)
        x0 = PAD + name_w
        draw.rectangle((x0, top + 2, x0 + bar_w, top + row_h - 2), outline=(200, 200, 200))
        if value is None:
            draw.text((x0 + bar_w + 4, top + 3), "n/a", fill=TEXT, font=font)
            continue
        x1 = x0 + round(bar_w * min(max(value, 0.0), 100.0) / 100.0)
        if x1 > x0:
            fill = (colours or {}).get(name, (59, 82, 139))
            draw.rectangle((x0, top + 2, x1, top + row_h - 2), fill=fill)
        draw.text((x0 + bar_w + 4, top + 3), f"{value:.1f}", fill=TEXT, font=font)
    return canvas


def iou_bar_chart(iou: Mapping[str, float | None], title: str) -> Image.Image:
    """Per-class IoU (%) bars in the class colours; absent classes say n/a."""
    return bar_chart(iou, title, dict(zip(CLASSES, PALETTE, strict=True)))


class DebugImages(Callback):
    """Every `every_n_steps` optimiser steps (step 0 included), a PNG panel of what the step saw.

    Rows per sample: source image / label / prediction; target image / pseudo-label / teacher
    confidence; mixed image / label / prediction; MIC masked image / prediction; for SSR the
    per-stage change the SAM fusion makes to the features. Files: `<out_dir>/step_XXXXXX.png`,
    plus `debug/panel` on wandb. After validation (and the final test) a per-class IoU bar plot
    (`<out_dir>/{val,test}_iou_step_XXXXXX.png`) and a wandb table.

    Args:
        every_n_steps: drawing interval in optimiser steps.
        out_dir: folder of the PNG files; None = `<trainer.default_root_dir>/debug`.
        max_images: samples of the batch drawn (one block of rows each).
        tile_size: tile height in pixels (the width follows the crop's aspect ratio).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        out_dir: str | None = None,
        max_images: int = 2,
        tile_size: int = 192,
    ) -> None:
        if every_n_steps < 1 or max_images < 1 or tile_size < 8:
            raise ConfigError(
                f"DebugImages(every_n_steps={every_n_steps}, max_images={max_images}, "
                f"tile_size={tile_size}): expected every_n_steps >= 1, max_images >= 1, "
                "tile_size >= 8"
            )
        self.every_n_steps = every_n_steps
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.max_images = max_images
        self.tile_size = tile_size
        self._step = 0

    def _dir(self, trainer: pl.Trainer) -> Path:
        path = self.out_dir or Path(trainer.default_root_dir) / "debug"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "capture_debug"):
            raise TypeError(
                f"DebugImages needs a module with `capture_debug` / `debug` (UDAModule), got "
                f"{type(pl_module).__name__}; remove callbacks.debug_images"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step
        # Every rank captures (the teacher re-run may hold SyncBatchNorm collectives); rank 0 draws.
        pl_module.capture_debug = trainer.global_step % self.every_n_steps == 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        debug = pl_module.debug
        pl_module.capture_debug, pl_module.debug = False, None  # free the copies at once
        if not debug or not trainer.is_global_zero:
            return
        panel = debug_panel(debug, self.max_images, self.tile_size)
        panel.save(self._dir(trainer) / f"step_{self._step:06d}.png")
        for lg in wandb_loggers(trainer):
            lg.log_image("debug/panel", [panel], step=self._step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_iou(trainer, "val", getattr(pl_module, "val_results", None))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_iou(trainer, "test", getattr(pl_module, "test_results", None))

    def _log_iou(self, trainer: pl.Trainer, stage: str, result: Mapping[str, Any] | None) -> None:
        """`SegMetric.compute()` of the epoch (kept by UDAModule) as a bar plot and a table."""
        if not trainer.is_global_zero or result is None:
            return
        iou, step = result["IoU"], trainer.global_step
        title = f"{stage} per-class IoU (%), mIoU {result['mIoU']:.2f}, step {step}"
        chart = iou_bar_chart(iou, title)
        chart.save(self._dir(trainer) / f"{stage}_iou_step_{step:06d}.png")
        for lg in wandb_loggers(trainer):
            rows = [[name, value] for name, value in iou.items()]
            lg.log_table(f"{stage}/IoU_table", columns=["class", "IoU"], data=rows, step=step)
            lg.log_image(f"{stage}/IoU_bars", [chart], step=step)
