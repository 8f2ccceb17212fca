"""Shared fixtures: the real-data fixtures in ../shared and a prepared synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import SHARED_FIXTURES

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# Set by .ci/run: a missing real-data fixture folder fails the tests instead of skipping them.
REQUIRE_FIXTURES = os.environ.get("SSR_REQUIRE_FIXTURES") == "1"


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
    from ssr.data import prepare, synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_source=8, num_target_train=4, num_target_val=2)
    prepare.prepare_gta5(root / "gta", nproc=1)
    prepare.prepare_cityscapes(root / "cityscapes", nproc=1)
    return root
