"""`make demo`: the whole method family on the synthetic domain shift, on a CPU, in minutes.

1. Writes the synthetic GTA5 -> Cityscapes shift to `data/synthetic` unless it is there
   (`python -m ssr.data.synthetic`) and converts its labels with the real preparation code
   (docs/method.md §7.2-§7.4, RCS statistics §4.2).
2. Trains the tiny DAFormer five ways with `python -m ssr.train experiment=<name>`: source-only,
   DAFormer (DACS self-training), MIC, SSR and MIC + SSR (with a tiny random-weight SAM), two runs
   at a time on two cores; each run's own console goes to `<run>/console.log`.
3. Prints target-val mIoU side by side and writes the table (`results.md`) and a bar chart
   (`results.png`) next to the runs.

One seed, 300 steps: the gap to source-only is real, the order among DAFormer, MIC and SSR is
within seed noise (benchmarks/uda_synthetic.py reports mean ± std over seeds). With random SAM
weights the SSR rows show that the regulariser trains, not that it helps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ssr.data.synthetic import generate_prepared
from ssr.errors import UserError
from ssr.io import atomic_write_text
from ssr.run.cli import cli
from ssr.run.panels import bar_chart

ROOT = Path(__file__).resolve().parents[1]
# Method label -> experiment; the order of the table and the chart.
RUNS = {
    "source-only": "demo",
    "DAFormer": "demo_daformer",
    "MIC": "demo_mic",
    "SSR (tiny random SAM)": "demo_ssr",
    "MIC + SSR (tiny random SAM)": "demo_mic_ssr",
}
COLOURS = {
    "source-only": (150, 150, 150),
    "DAFormer": (59, 82, 139),
    "MIC": (33, 145, 140),
    "SSR (tiny random SAM)": (94, 201, 98),
    "MIC + SSR (tiny random SAM)": (253, 180, 37),
}

console = Console()


class DemoError(UserError):
    """A demo step failed; the message says which one and where its log is."""


def train(experiment: str, data: Path, run_dir: Path) -> tuple[dict, float]:
    """`python -m ssr.train experiment=<experiment>`; its metrics.json and wall time."""
    cmd = [
        sys.executable,
        "-m",
        "ssr.train",
        f"experiment={experiment}",
        f"data.source_root={data / 'gta'}",
        f"data.target_root={data / 'cityscapes'}",
        # The run's console goes to a file and the demo shows each run's status: no progress bar.
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir / "console.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    metrics = run_dir / "metrics.json"
    if rc != 0 or not metrics.is_file():
        raise DemoError(f"experiment={experiment} failed (exit {rc}); see {run_dir}/console.log")
    return json.loads(metrics.read_text()), time.perf_counter() - start


def status_table(status: dict[str, str]) -> Table:
    table = Table(title="ssr demo: synthetic GTA5 -> Cityscapes shift, tiny DAFormer, CPU")
    table.add_column("method")
    table.add_column("experiment")
    table.add_column("status")
    for method, experiment in RUNS.items():
        table.add_row(method, experiment, status[method])
    return table


def results_markdown(results: dict[str, tuple[dict, float]]) -> str:
    base = results["source-only"][0]["mIoU"]
    lines = [
        "| method | experiment | target mIoU | Δ vs source-only | aAcc | time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, experiment in RUNS.items():
        metrics, seconds = results[method]
        delta = "" if experiment == "demo" else f"{metrics['mIoU'] - base:+.2f}"
        lines.append(
            f"| {method} | `{experiment}` | {metrics['mIoU']:.2f} | {delta} | "
            f"{metrics['aAcc']:.2f} | {seconds:.0f} s |"
        )
    return "\n".join(lines) + "\n"


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "demo")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    # One BLAS/OpenMP thread per run: at 4x64x64 batches thread synchronisation costs more than
    # it saves, and two runs share the two cores. An explicit OMP_NUM_THREADS is respected.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    start = time.perf_counter()
    data, out = args.data.absolute(), args.out.absolute() / time.strftime("%Y-%m-%d_%H-%M-%S")
    if generate_prepared(data, nproc=min(2, os.cpu_count() or 1), progress=True):
        console.print(f"[green]wrote the synthetic dataset to {data}")
    status = dict.fromkeys(RUNS, "queued")
    results: dict[str, tuple[dict, float]] = {}

    def run(method: str) -> None:
        status[method] = "training…"
        try:
            metrics, seconds = train(RUNS[method], data, out / RUNS[method])
        except DemoError:
            status[method] = "[red]failed"
            raise
        results[method] = metrics, seconds
        status[method] = f"[green]mIoU {metrics['mIoU']:.2f}[/green] ({seconds:.0f} s)"

    with Live(status_table(status), console=console, refresh_per_second=2, transient=True) as live:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run, method) for method in RUNS]
            while not all(f.done() for f in futures):
                live.update(status_table(status))
                time.sleep(0.5)
            live.update(status_table(status))
        for f in futures:
            f.result()  # a failed run raises its DemoError here

    markdown = results_markdown(results)
    atomic_write_text(out / "results.md", markdown)
    miou = {method: results[method][0]["mIoU"] for method in RUNS}
    chart = bar_chart(miou, "target val mIoU (%), tiny DAFormer, 300 steps, seed 0", COLOURS)
    chart.save(out / "results.png")
    table = Table(title="target val (50 synthetic Cityscapes-format images)")
    for column in ("method", "experiment", "mIoU", "Δ", "aAcc", "time"):
        table.add_column(column, justify="left" if column in ("method", "experiment") else "right")
    for row in markdown.splitlines()[2:]:
        table.add_row(*[c.strip().strip("`") for c in row.strip("|").split("|")])
    console.print(table)
    console.print(
        "One seed: the gain over source-only is real; the order among DAFormer, MIC and SSR is "
        "within seed noise (benchmarks/uda_synthetic.py: mean ± std over seeds)."
    )
    console.print(f"demo total {time.perf_counter() - start:.0f} s; table, chart and runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
