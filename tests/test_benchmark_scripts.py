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
