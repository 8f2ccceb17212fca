"""The paper-scale benchmark end to end in its smoke mode (tiny model, tiny SAM, 64² crops): each
step runs in its own process and the summary holds the ratios and SSR's overhead floor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_paper_scale_smoke(tmp_path: Path) -> None:
    out = tmp_path / "paper_scale.json"
    cmd = [sys.executable, str(BENCHMARKS / "paper_scale.py"), "--model", "daformer_tiny"]
    cmd += ["--sam", "tiny", "--size", "64", "--experiments", "daformer", "ssr", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCHMARKS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [s["experiment"] for s in result["steps"]] == ["daformer", "ssr"]
    assert all(s["seconds"] > 0 and s["crop"] == 64 for s in result["steps"])
    ssr = result["summary"]["ssr/daformer"]
    floor = ssr["floor_seconds"]
    assert floor["floor"] == pytest.approx(floor["sam_forward"] + floor["branches"])
    assert ssr["ratio"] == pytest.approx(
        result["summary"]["median_seconds"]["ssr"] / result["summary"]["median_seconds"]["daformer"]
    )


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    """The GPU check's whole path on the CPU: paper-scale steps, a short mic_ssr run, its
    evaluation, the JSON and the Markdown summary."""
    cmd = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--steps", "3"]
    cmd += ["--experiments", "daformer", "ssr", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["paper_scale"]["32-true"]["median_seconds"]) == {"daformer", "ssr"}
    run = report["short_run"]
    assert (run["train_exit"], run["eval_exit"]) == (0, 0)
    assert run["eval_mIoU"] == pytest.approx(run["train_mIoU"], abs=1e-6)
    assert (tmp_path / "gpu_paper_scale_32.json").is_file()
    assert "## 3-step mic_ssr run" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_without_a_gpu_says_how_to_smoke(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run for minutes")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "run with --smoke" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
