"""Shared test fixtures: the real-data fixtures in ../shared and cheap global settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The real Cityscapes/GTA5 fixture files; skips when ../shared is absent (a user's machine)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"real-data fixtures not found at {SHARED_FIXTURES} (../shared is CI-only)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared synthetic domain-shift dataset (GTA5 + Cityscapes format), built once."""
    from ssr.data import prepare, synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_source=8, num_target_train=4, num_target_val=2)
    assert prepare.main(["gta5", str(root / "gta"), "--nproc", "1"]) == 0
    assert prepare.main(["cityscapes", str(root / "cityscapes"), "--nproc", "1"]) == 0
    return root
