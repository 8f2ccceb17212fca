"""Prediction entry point: `python -m ssr.predict ckpt_path=... input=... output_dir=...`.

Segments an image, a folder of images or a video with the student (shadow branch, docs/method.md
§3.3) under the test protocol of the `inference` group (§3.2: keep-ratio resize to 1024x512,
whole-image inference, logits resized back to the original size; test-time augmentation with
`tta=flip|multiscale`). The model is a PyTorch checkpoint of any format or an exported `.onnx`.
Per image it writes `<stem>_trainIds.png` (uint8 train ids, scoreable with `ssr.eval pred_dir=...`),
`<stem>_color.png` and `<stem>_overlay.png`; with `confidence=true` also `<stem>_conf.png` (the
max softmax probability as 16-bit PNG, value / 65535), with `encoding=cityscapes` also
`<stem>_labelIds.png` (Cityscapes label ids, for the official evaluator and test server). A video
gives `<stem>_overlay.mp4`. With `format=acdc|darkzurich` it writes only the test server's
submission folders and `<format>_submission.zip` instead (`ssr.submission`, docs/test-server.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from torch import nn

from ssr import CONF_PATH
from ssr.data.files import read_image
from ssr.data.labels import colorize, train_ids_to_label_ids
from ssr.data.scaling import rescale_size
from ssr.data.transforms import test_transform
from ssr.errors import UserError
from ssr.io import atomic_write_png, find_files
from ssr.model.checkpoint import load_segmentor
from ssr.model.inference import Inference
from ssr.run.cli import cli, resolve_device
from ssr.submission import check_request, confidence_map, prepare
from ssr.submission import write as write_submission

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
# Our own outputs: skipped when a folder is searched, so a second run never segments them.
OUTPUT_SUFFIXES = ("_trainIds.png", "_color.png", "_overlay.png", "_conf.png", "_labelIds.png")
ENCODINGS = ("trainid", "cityscapes")
MIN_SIDE = 32  # the backbone's output stride: a smaller image has no stage-4 feature


class PredictInputError(UserError, ValueError):
    """The `input` cannot be segmented (missing, empty folder, unknown type, unreadable video)."""


class Predictor:
    """A loaded segmentor plus the test protocol: RGB uint8 in, train ids at input size out."""

    def __init__(
        self, segmentor: nn.Module, inference: Inference, device: torch.device | str = "cpu"
    ) -> None:
        self.segmentor = segmentor.to(device).eval()
        self.inference = inference
        self.device = torch.device(device)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 train ids."""
        return self.predict(rgb)[0]

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray, confidence: bool = False) -> tuple[np.ndarray, Any]:
        """(H, W) uint8 train ids and, if asked, (H, W) float32 max softmax probability."""
        resizes = self.inference.resizes(rgb.shape[:2])
        for r in resizes:
            h, w = rgb.shape[:2] if r is None else rescale_size(*rgb.shape[:2], r)
            if min(h, w) < MIN_SIDE:
                raise PredictInputError(
                    f"a {rgb.shape[1]}x{rgb.shape[0]} image becomes {w}x{h} at the test scale: "
                    f"too small for the network (at least {MIN_SIDE} pixels a side)"
                )
        imgs = [
            test_transform(r)(image=rgb)["image"].float().unsqueeze(0).to(self.device)
            for r in resizes
        ]
        ids, conf = self.inference.predict(self.segmentor, imgs, rgb.shape[:2], confidence)
        ids_np = ids[0].to(torch.uint8).cpu().numpy()
        return ids_np, None if conf is None else conf[0].float().cpu().numpy()


def overlay(rgb: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 blend of the image with the class colours (`alpha` = colour weight)."""
    return cv2.addWeighted(rgb, 1.0 - alpha, colorize(train_ids), alpha, 0.0)


def predict_images(
    predictor: Predictor,
    inputs: list[tuple[Path, Path]],
    alpha: float = 0.5,
    confidence: bool = False,
    encoding: str = "trainid",
) -> list[Path]:
    """Segment each (image, output folder) pair; returns the written files."""
    written = []
    for image_path, out_dir in _progress(inputs, "Predicting", len(inputs)):
        rgb = read_image(image_path)
        try:
            train_ids, conf = predictor.predict(rgb, confidence)
        except PredictInputError as err:
            raise PredictInputError(f"{image_path}: {err}") from err
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = image_path.stem
        outputs = {
            out_dir / f"{stem}_trainIds.png": train_ids,
            out_dir / f"{stem}_color.png": colorize(train_ids),
            out_dir / f"{stem}_overlay.png": overlay(rgb, train_ids, alpha),
        }
        if conf is not None:
            outputs[out_dir / f"{stem}_conf.png"] = confidence_map(conf)  # as Dark Zurich's
        if encoding == "cityscapes":
            outputs[out_dir / f"{stem}_labelIds.png"] = train_ids_to_label_ids(train_ids)
        for path, array in outputs.items():
            atomic_write_png(path, array)
        written += list(outputs)
    return written


def predict_video(
    predictor: Predictor, video_path: Path, out_dir: Path, alpha: float = 0.5
) -> Path:
    """Segment every frame; writes `<stem>_overlay.mp4` (mp4v, the input's frame rate)."""
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise PredictInputError(f"cannot open video {video_path}; is it a readable video file?")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{video_path.stem}_overlay.mp4"
    writer = None
    try:
        for frame in _progress(_frames(capture), "Predicting frames", total):
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            blended = overlay(rgb, predictor(rgb), alpha)
            if writer is None:
                height, width = rgb.shape[:2]
                fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                writer = cv2.VideoWriter(str(out_path), fourcc, fps, (width, height))
            writer.write(cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise PredictInputError(f"video {video_path} has no readable frame")
    return out_path


def collect_images(input_path: Path, output_dir: Path) -> list[tuple[Path, Path]]:
    """(image, output folder) pairs; a folder is searched recursively and mirrored in output_dir."""
    if input_path.is_file():
        return [(input_path, output_dir)]
    images = sorted(
        p
        for p in find_files(input_path, "*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(OUTPUT_SUFFIXES)
    )
    if not images:
        raise PredictInputError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) under {input_path}; pass an image, "
            "a folder of images or a video"
        )
    return [(p, output_dir / p.parent.relative_to(input_path)) for p in images]


def run(cfg: DictConfig) -> list[Path]:
    """Segment `cfg.input` into `cfg.output_dir`; returns the written files."""
    input_path = Path(cfg.input)
    if not input_path.exists():
        raise PredictInputError(
            f"input {input_path} does not exist; pass an image, folder or video"
        )
    suffix = input_path.suffix.lower()
    if input_path.is_file() and suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise PredictInputError(
            f"input {input_path} has unknown type {suffix!r}; images: {', '.join(IMAGE_SUFFIXES)}, "
            f"videos: {', '.join(VIDEO_SUFFIXES)}"
        )
    is_video = input_path.is_file() and suffix in VIDEO_SUFFIXES
    if cfg.encoding not in ENCODINGS:
        raise PredictInputError(f"encoding={cfg.encoding}; choose one of {', '.join(ENCODINGS)}")
    fmt = cfg.get("format")  # a test-server submission (ssr.submission)
    fmt = None if fmt is None else check_request(fmt, is_video, cfg.encoding, cfg.confidence)
    if is_video and (cfg.confidence or cfg.encoding != "trainid"):
        raise PredictInputError(
            "confidence and encoding apply to images; a video gives <stem>_overlay.mp4 only"
        )
    output_dir = Path(cfg.output_dir)
    # Inputs are listed before the (possibly large) checkpoint is read, so mistakes fail fast.
    inputs = [] if is_video else collect_images(input_path, output_dir)
    plan = None if fmt is None else prepare(fmt, [p for p, _ in inputs], input_path, output_dir)
    device = resolve_device(cfg.device)
    segmentor, _, _ = load_segmentor(cfg.ckpt_path, cfg.model, device)
    inference = instantiate(cfg.inference).for_model(segmentor)  # HRDA: its own protocol
    predictor = Predictor(segmentor, inference, device)
    if is_video:
        written = [predict_video(predictor, input_path, output_dir, cfg.overlay_alpha)]
    elif plan is not None:
        written = write_submission(plan, predictor, _progress)
    else:
        written = predict_images(predictor, inputs, cfg.overlay_alpha, cfg.confidence, cfg.encoding)
    log.info(f"Wrote {len(written)} files to {output_dir}")
    return written


def _frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _progress(items: Any, description: str, total: int | None) -> Iterator[Any]:
    """A rich progress bar on stderr, so stdout stays clean for pipes."""
    return iter(track(items, description=description, total=total, console=Console(stderr=True)))


@hydra.main(config_path=CONF_PATH, config_name="predict", version_base="1.3")
@cli
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
