"""Shared fixtures: the real-data fixtures in ../shared and a prepared synthetic dataset."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ssr.model.checkpoint import export_segmentor

from helpers import CS_FRAMES, CS_H, CS_W, SHARED_FIXTURES, compose_cfg

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# Set by .ci/run: a missing real-data fixture folder fails the tests instead of skipping them.
REQUIRE_FIXTURES = os.environ.get("SSR_REQUIRE_FIXTURES") == "1"

# A suite started in the background (`make test &`, some CI runners) inherits an ignored SIGINT, and
# the runs under test then rightly leave Ctrl-C alone; the Ctrl-C tests need a terminal's handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The real Cityscapes/GTA5 frames; skipped where ../shared is absent (a user's machine)."""
    if not SHARED_FIXTURES.is_dir():
        reason = f"real-data fixtures not found at {SHARED_FIXTURES}"
        if REQUIRE_FIXTURES:
            pytest.fail(f"{reason}, and SSR_REQUIRE_FIXTURES=1 forbids skipping them")
        pytest.skip(f"{reason} (research-only files, not in the repository)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared synthetic domain-shift dataset (GTA5 + Cityscapes format), built once."""
    from ssr.data.synthetic import generate_prepared

    root = tmp_path_factory.mktemp("synthetic")
    # Also in SYNTHIA's, ACDC's and Dark Zurich's formats (the gta/ and cityscapes/ bytes are the
    # same with or without them), prepared like the real ones.
    benchmarks = ["synthia", "acdc", "darkzurich"]
    generate_prepared(
        root, num_source=8, num_target_train=4, num_target_val=2, benchmarks=benchmarks
    )
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised tiny DAFormer exported as an ssr-segmentor file."""
    torch.manual_seed(0)
    cfg = compose_cfg("eval", "model=daformer_tiny")
    segmentor = instantiate(cfg.model).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    export_segmentor(segmentor, path, model_config=model_config, meta={"test": True})
    return path, segmentor


@pytest.fixture(scope="session")
def cs_root(tmp_path_factory) -> Path:
    """Two 128x64 val frames in two cities: smooth images, labels with 4 classes and ignore."""
    root = tmp_path_factory.mktemp("cityscapes")
    rng = np.random.default_rng(0)
    for i, frame in enumerate(CS_FRAMES):
        img_path = root / "leftImg8bit" / "val" / f"{frame}_leftImg8bit.png"
        gt_path = root / "gtFine" / "val" / f"{frame}_gtFine_labelTrainIds.png"
        img_path.parent.mkdir(parents=True)
        gt_path.parent.mkdir(parents=True)
        img = cv2.resize(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8), (CS_W, CS_H))
        Image.fromarray(img).save(img_path)
        label = np.full((CS_H, CS_W), 0, dtype=np.uint8)  # road
        label[: CS_H // 3] = 10  # sky
        label[CS_H // 3 : CS_H // 2, : CS_W // 2] = 2  # building
        label[CS_H // 2 :, CS_W // 2 + 8 * i :] = 13  # car
        label[-4:] = 255
        Image.fromarray(label).save(gt_path)
    return root
