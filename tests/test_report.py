"""`python -m ssr.report`: mean ± std over seeds from fabricated multirun folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from ssr import report
from ssr.data.labels import CLASSES

from helpers import compose_cfg, exit_code, run_cli


def fake_run(
    root: Path,
    job: str,
    overrides: list[str],
    miou: float,
    road: float,
    train: float | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """A Hydra job folder as ssr.train leaves it: .hydra/overrides.yaml and metrics.json."""
    (root / job / ".hydra").mkdir(parents=True)
    (root / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    iou = {c: 50.0 for c in CLASSES} | {"road": road, "train": train}
    metrics = {"mIoU": miou, "IoU": iou, "aAcc": 90.0, "num_images": 500} | (extra or {})
    (root / job / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    # experiment=mic_ssr, seeds 0, 1, 2 (job 10 checks the natural 2 < 10 order)
    fake_run(root, "0", ["experiment=mic_ssr", "seed=0"], 68.0, 97.0, 60.0)
    fake_run(root, "1", ["experiment=mic_ssr", "seed=1"], 69.0, 96.0, None)
    fake_run(root, "10", ["experiment=mic_ssr", "seed=2"], 70.0, 98.0, 64.0)
    # a second group, one seed, a "++" override
    fake_run(root, "2", ["experiment=mic", "++seed=0"], 66.5, 95.0, 10.0)
    return root


def test_groups_by_overrides_except_seed_with_mean_and_std(sweep: Path) -> None:
    groups = report.collect(sweep)
    assert [g.label for g in groups] == ["experiment=mic_ssr", "experiment=mic"]
    ssr, mic = groups
    assert ssr.seeds == "0,1,2" and [r.path for r in ssr.runs] == ["0", "1", "10"]
    # By hand: mean(68, 69, 70) = 69, sample std = sqrt(((-1)² + 0² + 1²) / 2) = 1.
    assert ssr.stat("mIoU") == pytest.approx((69.0, 1.0, 3))
    # road: mean(97, 96, 98) = 97, std 1; train: absent in one run -> mean(60, 64) = 62,
    # std = sqrt((2² + 2²) / 1) = 2.828…, over 2 values.
    assert ssr.stat("road") == pytest.approx((97.0, 1.0, 3))
    assert ssr.stat("train") == pytest.approx((62.0, 8**0.5, 2))
    assert mic.stat("mIoU") == (66.5, None, 1)  # one seed: no std


def test_cli_writes_markdown_and_csv(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert exit_code(report.main, [str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith("| group | seeds | mIoU | aAcc | road |")
    row = next(line for line in md if line.startswith("| experiment=mic_ssr"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["experiment=mic_ssr", "3 (0,1,2)", "69.00 ± 1.00"]
    assert cells[3:5] == ["90.00 ± 0.00", "97.00 ± 1.00"]  # aAcc, road
    assert cells[2 + 2 + CLASSES.index("train")] == "62.00 ± 2.83 (2/3)"
    assert "| experiment=mic | 1 (0) | 66.50 |" in (out / "report.md").read_text()
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["experiment=mic_ssr", "experiment=mic"]
    assert rows[0]["mIoU_mean"] == "69.0000" and rows[0]["mIoU_std"] == "1.0000"
    assert rows[0]["train_n"] == "2" and rows[0]["runs"] == "0;1;10"
    assert rows[1]["mIoU_std"] == "" and rows[1]["n_runs"] == "1"


def test_overrides_with_interpolations_are_read_as_text(tmp_path: Path) -> None:
    """The benchmark's oracle runs carry data.source_resize=${data.target_resize}."""
    override = "data.source_resize=${data.target_resize}"
    for seed in (0, 1):
        fake_run(tmp_path, f"oracle_s{seed}", [override, f"seed={seed}"], 30.0 + seed, 90.0, None)
    (group,) = report.collect(tmp_path)
    assert group.label == override and group.stat("mIoU") == (
        30.5,
        pytest.approx(0.7071, abs=1e-4),
        2,
    )


def test_more_ignored_keys_merge_groups(sweep: Path) -> None:
    groups = report.collect(sweep, ignore=["seed", "experiment"])
    assert len(groups) == 1 and groups[0].label == "(no overrides)" and len(groups[0].runs) == 4


def test_folder_without_metrics_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`python -m ssr.report` in a subprocess: exit status 2 and one line on stderr."""
    (tmp_path / "empty" / "0").mkdir(parents=True)
    proc = run_cli("ssr.report", str(tmp_path / "empty"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no metrics.json under" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "unreadable metrics file"), ('{"mIoU": 1.0}', "expected {'mIoU'")],
)
def test_bad_metrics_file_names_the_file(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text(content)
    assert exit_code(report.main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "0" / "metrics.json") in err


def test_missing_folder_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(report.main, [str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_seed_sweep_config_is_a_three_seed_multirun() -> None:
    cfg = compose_cfg("train", "experiment=demo", "sweep=seeds", hydra=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params == {"seed": "0,1,2"}


# ------------------------------------------------------------------ class subsets (mIoU16, mIoU13)
SYN = "data=syn2cs"


@pytest.fixture
def synthia_sweep(tmp_path: Path) -> Path:
    """Three SYNTHIA seeds with mIoU16 / mIoU13 in metrics.json, one GTA run without them."""
    root = tmp_path / "multirun"
    for job, (m16, m13) in enumerate([(50.0, 60.0), (52.0, 61.0), (54.0, 65.0)]):
        extra = {"mIoU16": m16, "mIoU13": m13}
        fake_run(root, str(job), [SYN, f"seed={job}"], 45.0, 90.0, None, extra)
    fake_run(root, "3", ["data=gta2cs", "seed=0"], 66.0, 95.0, 10.0)
    return root


def test_subset_means_get_mean_and_std_like_miou(synthia_sweep: Path, tmp_path: Path) -> None:
    groups = report.collect(synthia_sweep)
    syn, gta = groups
    assert report.subset_names(groups) == ["mIoU16", "mIoU13"]  # the order in the files
    # By hand: mIoU16 mean(50, 52, 54) = 52, std sqrt((2² + 0² + 2²) / 2) = 2;
    # mIoU13 mean(60, 61, 65) = 62, std sqrt((2² + 1² + 3²) / 2) = sqrt(7) = 2.6458.
    assert syn.stat("mIoU16") == pytest.approx((52.0, 2.0, 3))
    assert syn.stat("mIoU13") == pytest.approx((62.0, 7**0.5, 3))
    assert gta.stat("mIoU16") == (None, None, 0)  # a run without subsets

    out = tmp_path / "out"
    assert exit_code(report.main, [str(synthia_sweep), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    md = text.splitlines()
    assert md[0].startswith("| group | seeds | mIoU | mIoU16 | mIoU13 | aAcc | road |")
    row = next(line for line in md if line.startswith(f"| {SYN}"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["45.00 ± 0.00", "52.00 ± 2.00", "62.00 ± 2.65", "90.00 ± 0.00"]
    row = next(line for line in md if line.startswith("| data=gta2cs"))
    assert [c.strip() for c in row.strip("|").split("|")][2:5] == ["66.00", "n/a", "n/a"]
    assert "mIoU16, mIoU13: mean IoU over a class subset" in text
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["mIoU16_mean"] == "52.0000" and rows[0]["mIoU16_std"] == "2.0000"
    assert rows[0]["mIoU13_n"] == "3" and rows[1]["mIoU16_n"] == "0"
    assert rows[1]["mIoU16_mean"] == ""


def test_subset_in_only_some_runs_is_over_those_and_marked(tmp_path: Path) -> None:
    """A seed evaluated before subsets existed (no key) or with no subset class present (null, as
    ssr.eval writes NaN; ssr.train writes NaN as is) is left out, and the cell says (n/N)."""
    fake_run(tmp_path, "0", [SYN, "seed=0"], 45.0, 90.0, None, {"mIoU16": 50.0, "mIoU13": 60.0})
    fake_run(tmp_path, "1", [SYN, "seed=1"], 46.0, 90.0, None, {"mIoU16": 54.0, "mIoU13": None})
    fake_run(tmp_path, "2", [SYN, "seed=2"], 47.0, 90.0, None)  # an older run: no subset keys
    seed1 = tmp_path / "1" / "metrics.json"
    seed1.write_text(seed1.read_text().replace('"mIoU13": null', '"mIoU13": NaN'))
    assert '"mIoU13": NaN' in seed1.read_text()
    (group,) = report.collect(tmp_path)
    # By hand: mIoU16 over seeds 0, 1: mean(50, 54) = 52, std sqrt((2² + 2²) / 1) = 2.83;
    # mIoU13 over seed 0 only: 60, no std.
    assert group.stat("mIoU16") == pytest.approx((52.0, 8**0.5, 2))
    assert group.stat("mIoU13") == (60.0, None, 1)
    assert group.stat("mIoU") == pytest.approx((46.0, 1.0, 3))  # mIoU still over all three
    md = report.markdown([group]).splitlines()
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert cells[2:5] == ["46.00 ± 1.00", "52.00 ± 2.83 (2/3)", "60.00 (1/3)"]


def test_sweep_without_subsets_has_no_subset_columns(sweep: Path) -> None:
    groups = report.collect(sweep)
    assert report.subset_names(groups) == [] and all(not r.subsets for r in groups[0].runs)
    text = report.markdown(groups)
    assert "| mIoU | aAcc |" in text and "class subset" not in text


def test_bad_subset_value_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake_run(tmp_path, "0", [SYN, "seed=0"], 45.0, 90.0, None, {"mIoU16": "high"})
    assert exit_code(report.main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mIoU16 is 'high', expected a number or null" in err and "metrics.json" in err
