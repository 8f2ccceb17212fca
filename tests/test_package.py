"""The package as users install it: a wheel that works from any directory, and the layering."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import CLI_ENV, PROJECT_ROOT


def test_wheel_ships_its_configs_and_runs_from_another_directory(tmp_path: Path) -> None:
    """`pip install` (not editable) puts the Hydra configs inside the package: the CLIs compose
    `experiment=mic_ssr` and answer `--help` from a directory far from the repository."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info into its folder
    skip = shutil.ignore_patterns("*.egg-info", "__pycache__")
    shutil.copytree(PROJECT_ROOT / "src", source / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("ssr-*.whl")
    install = [*pip, "install", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    env = {**CLI_ENV, "PYTHONPATH": str(target)}  # the installed copy, not the checkout

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True
        )

    where = run("-c", "import ssr.conf; print(ssr.conf.__file__)")
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    job = run("-m", "ssr.train", "experiment=mic_ssr", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert (
        "sam_vit_b_01ec64.pth" in job.stdout and "ssr.uda.masking.MaskedConsistency" in job.stdout
    )
    help_ = run("-m", "ssr.eval", "--help")
    assert help_.returncode == 0 and "eval is powered by Hydra" in help_.stdout, help_.stderr


def test_the_shipped_model_imports_nothing_training_only() -> None:
    """`ssr.model` (what runs at inference) loads no module of `ssr.uda` or `ssr.run`."""
    code = (
        "import sys, ssr.model; "
        "print(sorted(m for m in sys.modules if m.startswith(('ssr.uda', 'ssr.run'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
