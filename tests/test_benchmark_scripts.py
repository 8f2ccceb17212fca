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
    """Warm-up and timed steps per child, the floor, and a failing variant recorded, not fatal."""
    out = tmp_path / "paper_scale.json"
    bad = "ssr:uda.sam.attention=bogus"
    cmd = [sys.executable, str(BENCHMARKS / "paper_scale.py"), "--model", "daformer_tiny"]
    cmd += ["--sam", "tiny", "--size", "64", "--warmup", "1", "--steps", "2", "--out", str(out)]
    cmd += ["--experiments", "daformer", "ssr", bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCHMARKS, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the bad variant
    result = json.loads(out.read_text())
    assert [s["experiment"] for s in result["steps"]] == ["daformer", "ssr", bad]
    assert "bogus" in result["steps"][2]["error"]
    timed = result["steps"][:2]
    assert all(len(s["timed_seconds"]) == 2 and s["crop"] == 64 for s in timed)
    assert all(s["seconds"] == pytest.approx(sum(s["timed_seconds"]) / 2) for s in timed)
    summary = result["summary"]
    assert summary["failed"] == [bad] and set(summary["median_seconds"]) == {"daformer", "ssr"}
    ssr = summary["ssr/daformer"]
    floor = ssr["floor_seconds"]
    assert floor["floor"] == pytest.approx(floor["sam_forward"] + floor["branches"])
    assert floor["branches"] == pytest.approx(floor["fusion"] + floor["decode"])
    assert ssr["rest_seconds"] == pytest.approx(ssr["overhead_seconds"] - floor["floor"])
    assert ssr["ratio"] == pytest.approx(
        summary["median_seconds"]["ssr"] / summary["median_seconds"]["daformer"]
    )


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    """The GPU check's whole path on the CPU, in two calls whose parts add up in one report:
    a short mic_ssr run and its evaluation, paper-scale steps (an operator profile of each),
    then the memory-table variants; the JSON and the Markdown."""
    cmd = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--steps", "3"]
    cmd += ["--experiments", "daformer", "ssr", "--out-dir", str(tmp_path)]
    for parts in (["run", "fp32"], ["extras"]):
        proc = subprocess.run(
            [*cmd, "--parts", *parts], capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["seconds"]) == {"run", "fp32", "extras"}
    assert set(report["paper_scale"]["fp32"]["median_seconds"]) == {"daformer", "ssr"}
    extras = report["paper_scale"]["extras"]["median_seconds"]
    assert "mic_ssr:uda.single_backward=true" in extras and "ssr:uda.channels_last=true" in extras
    assert not any("compile" in name for name in extras)  # compiling is for the GPU run
    run = report["short_run"]
    assert (run["train_exit"], run["eval_exit"]) == (0, 0)
    assert run["eval_mIoU"] == pytest.approx(run["train_mIoU"], abs=1e-6)
    assert (tmp_path / "gpu_paper_scale_fp32.json").is_file()
    assert "aten::" in (tmp_path / "gpu_paper_scale_fp32_profile_ssr.txt").read_text()
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
