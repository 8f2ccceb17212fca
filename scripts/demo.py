"""`make demo`: synthetic data -> tiny DAFormer, source-only and self-trained (CPU) -> mIoU.

1. Writes the synthetic GTA5 -> Cityscapes shift to `data/synthetic` unless it is there (issue 2,
   `ssr.data.synthetic`), and converts its labels with the real preparation CLI (ALGORITHM.md
   §7.2-§7.4, RCS statistics §4.2) unless that was done.
2. Trains `experiment=demo` (supervised on the source, the source-only baseline) and
   `experiment=demo_daformer` (DACS self-training + RCS + pseudo-label crop, ALGORITHM.md §4) with
   `python -m ssr.train`; each run prints its per-class IoU table on the target val split.
3. Prints source-only vs DAFormer target mIoU side by side.

About 3-4 minutes on 2 CPU cores. `benchmarks/uda_synthetic.py` is the longer, recorded version
(MIC, SSR and a target-supervised oracle too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ssr.data import prepare
from ssr.data.synthetic import SyntheticDataError, generate

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"source-only": "demo", "DAFormer (self-training)": "demo_daformer"}

console = Console()


class DemoError(RuntimeError):
    """A demo step failed; the message says which one and what to look at."""


def ensure_data(data: Path) -> None:
    """Generate the synthetic set if absent and write its train-id labels + RCS statistics."""
    try:
        written = generate(data, progress=True)
    except SyntheticDataError as err:
        raise DemoError(f"synthetic data: {err}") from err
    if written:
        console.print(f"[green]wrote the synthetic dataset to {data}")
    gta, cityscapes = data / "gta", data / "cityscapes"
    raw = list((gta / "labels").glob("*[0-9].png"))
    gta_ready = (gta / "sample_class_stats.json").is_file() and len(raw) == len(
        list((gta / "labels").glob("*_labelTrainIds.png"))
    )
    cs_ready = len(list((cityscapes / "gtFine").glob("*/*/*_gtFine_labelIds.png"))) == len(
        list((cityscapes / "gtFine").glob("*/*/*_gtFine_labelTrainIds.png"))
    )
    for name, root, ready in (("gta5", gta, gta_ready), ("cityscapes", cityscapes, cs_ready)):
        if not ready and prepare.main([name, str(root)]) != 0:
            raise DemoError(f"python -m ssr.data.prepare {name} {root} failed (message above)")


def train(experiment: str, data: Path, log_dir: Path) -> tuple[dict, float]:
    """Run `python -m ssr.train experiment=<experiment>`; return its metrics.json and wall time."""
    run_dir = log_dir / experiment / time.strftime("%Y-%m-%d_%H-%M-%S")
    cmd = [
        sys.executable,
        "-m",
        "ssr.train",
        f"experiment={experiment}",
        f"data.source_root={data / 'gta'}",
        f"data.target_root={data / 'cityscapes'}",
        f"hydra.run.dir={run_dir}",
    ]
    console.rule(f"[bold]python -m ssr.train experiment={experiment}")
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    metrics = run_dir / "metrics.json"
    if rc != 0 or not metrics.is_file():
        raise DemoError(
            f"training experiment={experiment} failed (exit code {rc}); see the output above "
            f"and {run_dir}/train.log"
        )
    return json.loads(metrics.read_text()), seconds


def summary(results: dict[str, tuple[dict, float]]) -> Table:
    table = Table(title="Synthetic GTA5 -> Cityscapes shift, tiny DAFormer, target val")
    for col in ("method", "experiment", "mIoU", "aAcc", "time"):
        table.add_column(col, justify="left" if col in ("method", "experiment") else "right")
    for method, experiment in RUNS.items():
        metrics, seconds = results[experiment]
        table.add_row(
            method,
            experiment,
            f"{metrics['mIoU']:.2f}",
            f"{metrics['aAcc']:.2f}",
            f"{seconds:.0f} s",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "logs" / "demo_runs")
    args = parser.parse_args(argv)
    # One BLAS/OpenMP thread: at 4x64x64 batches, thread synchronisation costs more than it saves
    # (on a busy 2-core machine a training step took 8x longer with 2 threads), and the data
    # loader worker takes the other core. An explicit OMP_NUM_THREADS is respected.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    start = time.perf_counter()
    try:
        ensure_data(args.data.absolute())
        results = {
            exp: train(exp, args.data.absolute(), args.log_dir.absolute()) for exp in RUNS.values()
        }
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)  # one unwrapped line
        return 1
    console.rule("[bold]summary")
    console.print(summary(results))
    source, uda = (results[exp][0]["mIoU"] for exp in RUNS.values())
    if uda > source:
        console.print(f"self-training gain on the target domain: [green]+{uda - source:.2f} mIoU")
    else:
        console.print(
            f"[yellow]warning:[/yellow] self-training did not beat source-only "
            f"({uda:.2f} vs {source:.2f} mIoU); see benchmarks/uda_synthetic.py for the full study"
        )
    console.print(f"demo total: {time.perf_counter() - start:.0f} s; runs in {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
