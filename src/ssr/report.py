"""Aggregate a seed sweep: mean ± std of mIoU and per-class IoU, as the papers report.

`python -m ssr.report <sweep_dir> [--out DIR] [--ignore KEY ...]` reads every run's `metrics.json`
(written by `ssr.train`: the final student on the target val split, docs/method.md §8.4) under
`sweep_dir`, groups the runs by their Hydra overrides (`.hydra/overrides.yaml`) except the seed,
prints a table and writes `report.md` and `report.csv`. The std is the sample std (n − 1).

Class-subset means a run's `metrics.json` carries ("mIoU16", "mIoU13" for SYNTHIA -> Cityscapes,
`ssr.metrics.SegMetric(subsets=...)`) get their own mean ± std columns right after mIoU; a sweep
without them reports exactly as before.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from ssr.data.labels import CLASSES, SUBSET_KEY
from ssr.errors import UserError
from ssr.io import atomic_write_text, find_files
from ssr.run.cli import cli

METRICS_FILE = "metrics.json"


class ReportError(UserError, RuntimeError):
    """A sweep directory without readable `metrics.json` files."""


@dataclass(frozen=True)
class Run:
    """One finished run: its directory (relative to the sweep), group label, seed and metrics."""

    path: str
    group: str
    seed: int | None
    miou: float
    aacc: float | None
    iou: dict[str, float | None]
    num_images: int | None
    # Class-subset means in the file (None: no class of the subset present, NaN in the metric).
    subsets: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Group:
    """The runs that differ only in the ignored overrides (the seed)."""

    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> str:
        return ",".join("?" if r.seed is None else str(r.seed) for r in self.runs)

    def stat(self, metric: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std or None for one value, n) of "mIoU", "aAcc", a subset or a class.

        A subset mean (e.g. "mIoU16") is taken over the runs whose file has it: runs evaluated
        before subsets existed (or with none) are left out, and n < len(runs) says so in the cell
        ("(n/N)", as for a class absent from some runs) and in the CSV's `<metric>_n`.
        """
        if metric == "mIoU":
            values = [r.miou for r in self.runs]
        elif metric == "aAcc":
            values = [r.aacc for r in self.runs if r.aacc is not None]
        elif SUBSET_KEY.fullmatch(metric):
            values = [r.subsets.get(metric) for r in self.runs]
            values = [v for v in values if v is not None]
        else:
            values = [r.iou.get(metric) for r in self.runs]
            values = [v for v in values if v is not None]  # a class absent from a run's val set
        if not values:
            return None, None, 0
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)


def _natural_key(path: Path) -> list[Any]:
    """Sort multirun job folders 0, 1, 2, …, 10 rather than 0, 1, 10, 2."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def _number(value: Any, what: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{path}: {what} is {value!r}, expected a number or null")
    return float(value)


def _subset_means(data: dict[str, Any], path: Path) -> dict[str, float | None]:
    """The class-subset means of a `metrics.json`; NaN (ssr.train writes it as is) -> None."""
    means = {k: _number(v, k, path) for k, v in data.items() if SUBSET_KEY.fullmatch(k)}
    return {k: None if v is None or math.isnan(v) else v for k, v in means.items()}


def subset_names(groups: Sequence[Group]) -> list[str]:
    """Every class-subset key any run has, in the order first met (mIoU16 before mIoU13)."""
    names: dict[str, None] = {}
    for g in groups:
        for r in g.runs:
            names.update(dict.fromkeys(r.subsets))
    return list(names)


def read_run(metrics_path: Path, sweep_dir: Path, ignore: Sequence[str]) -> Run:
    """One run from its `metrics.json` and the `.hydra/` files next to it."""
    try:
        data = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{metrics_path}: unreadable metrics file ({err})") from err
    if not isinstance(data, dict) or "mIoU" not in data or not isinstance(data.get("IoU"), dict):
        raise ReportError(
            f"{metrics_path}: expected {{'mIoU', 'IoU': {{class: IoU}}, 'aAcc', 'num_images'}} "
            "as written by ssr.train"
        )
    run_dir = metrics_path.parent
    overrides, seed = _overrides_and_seed(run_dir)
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ignore]
    miou = _number(data["mIoU"], "mIoU", metrics_path)
    if miou is None or math.isnan(miou):
        raise ReportError(f"{metrics_path}: mIoU is {data['mIoU']!r}, expected a number")
    return Run(
        path=run_dir.relative_to(sweep_dir).as_posix() or ".",
        group=" ".join(keep) or "(no overrides)",
        seed=seed,
        miou=miou,
        aacc=_number(data.get("aAcc"), "aAcc", metrics_path),
        iou={c: _number(data["IoU"].get(c), f"IoU[{c}]", metrics_path) for c in CLASSES},
        num_images=data.get("num_images"),
        subsets=_subset_means(data, metrics_path),
    )


def _overrides_and_seed(run_dir: Path) -> tuple[list[str], int | None]:
    """The run's command-line overrides and seed (override, else the saved config, else None)."""
    hydra_dir = run_dir / ".hydra"
    overrides: list[str] = []
    if (hydra_dir / "overrides.yaml").is_file():
        # Unresolved: an override such as a=${b} is a string here, not an interpolation.
        values = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"), resolve=False)
        overrides = [str(o) for o in values]
    seed: Any = None
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "seed":
            seed = value
    if seed is None and (hydra_dir / "config.yaml").is_file():
        seed = OmegaConf.load(hydra_dir / "config.yaml").get("seed")
    try:
        return overrides, None if seed is None else int(seed)
    except ValueError:
        return overrides, None


def collect(sweep_dir: Path, ignore: Sequence[str] = ("seed",)) -> list[Group]:
    """Every run under `sweep_dir`, grouped; groups and runs in (natural) directory order."""
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory; pass a Hydra multirun folder")
    paths = sorted(find_files(sweep_dir, METRICS_FILE), key=lambda p: _natural_key(p.parent))
    if not paths:
        raise ReportError(
            f"no {METRICS_FILE} under {sweep_dir}; pass the multirun folder of finished runs "
            "(ssr.train writes <run>/metrics.json when test_after_fit=true)"
        )
    groups: dict[str, Group] = {}
    for path in paths:
        run = read_run(path, sweep_dir, ignore)
        groups.setdefault(run.group, Group(run.group)).runs.append(run)
    return list(groups.values())


def _cell(group: Group, metric: str) -> str:
    """ "mean ± std", "(n/N)" when only n of the N runs have the value, "n/a" when none."""
    mean, std, n = group.stat(metric)
    if mean is None:
        return "n/a"
    text = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    return text if n == len(group.runs) else f"{text} ({n}/{len(group.runs)})"


def markdown(groups: Sequence[Group]) -> str:
    """One row per group, the paper's layout: mIoU (and its subset means), then the 19 classes."""
    subsets = subset_names(groups)
    metrics = ("mIoU", *subsets, "aAcc", *CLASSES)
    head = ["group", "seeds", *metrics]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|",
    ]
    for g in groups:
        cells = [g.label.replace("|", "\\|"), f"{len(g.runs)} ({g.seeds})"]
        cells += [_cell(g, m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "IoU in %, mean ± sample standard deviation (n − 1) over the runs of each group "
        "(final student on the target val split); (n/N): only n of the N runs have the class in "
        "their evaluation; n/a: none has."
    )
    if subsets:
        note += (
            f" {', '.join(subsets)}: mean IoU over a class subset (SYNTHIA: mIoU16, mIoU13), "
            "computed directly from each run's per-class IoUs; (n/N) there: only n of the N "
            "runs' metrics.json have it."
        )
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_csv(groups: Sequence[Group], path: Path) -> None:
    """Machine-readable: mean/std/n per metric and class, and the run folders of each group."""
    metrics = ("mIoU", *subset_names(groups), "aAcc", *CLASSES)
    head = ["group", "n_runs", "seeds", "num_images", "runs"]
    head += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(head)
    for g in groups:
        images = sorted({str(r.num_images) for r in g.runs})
        row: list[Any] = [g.label, len(g.runs), g.seeds, ";".join(images)]
        row.append(";".join(r.path for r in g.runs))
        for m in metrics:
            mean, std, n = g.stat(m)
            row += ["" if mean is None else f"{mean:.4f}", "" if std is None else f"{std:.4f}", n]
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def rich_table(groups: Sequence[Group], title: str) -> Table:
    """Groups as columns (fits a terminal better than 19 class columns)."""
    table = Table(title=title)
    table.add_column("")
    for g in groups:
        table.add_column(g.label, justify="right")
    table.add_row("runs (seeds)", *[f"{len(g.runs)} ({g.seeds})" for g in groups])
    for m in ("mIoU", *subset_names(groups)):
        table.add_row(f"[bold]{m}[/bold]", *[f"[bold]{_cell(g, m)}[/bold]" for g in groups])
    table.add_row("aAcc", *[_cell(g, "aAcc") for g in groups])
    table.add_section()
    for c in CLASSES:
        table.add_row(c, *[_cell(g, c) for g in groups])
    return table


@cli
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssr.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="Hydra multirun folder (or any parent)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    parser.add_argument(
        "--ignore",
        nargs="*",
        default=[],
        metavar="KEY",
        help="more override keys that do not split groups (seed never does)",
    )
    args = parser.parse_args(argv)
    groups = collect(args.sweep_dir, ignore=["seed", *args.ignore])
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown(groups))
    write_csv(groups, out / "report.csv")
    n = sum(len(g.runs) for g in groups)
    Console().print(rich_table(groups, f"{args.sweep_dir}: {n} runs, {len(groups)} groups"))
    print(f"wrote {out / 'report.md'} and {out / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
