"""Does self-training close the synthetic domain gap? Target-val mIoU per method, over seeds.

Trains the tiny DAFormer (and the tiny HRDA) on the synthetic GTA5 -> Cityscapes shift
(`ssr.data.synthetic`) with one step budget for every method and every seed, each as
`python -m ssr.train experiment=<name>`:
  source_only  experiment=demo           supervised on the source only (the lower bound)
  daformer     experiment=demo_daformer  DACS self-training + RCS + PL crop (docs/method.md §4)
  mic          experiment=demo_mic       + masked image consistency (§5)
  ssr          experiment=demo_ssr       DAFormer + SSR with a tiny random-weight SAM (§6);
                                         exercises the path, no accuracy claim
  mic_ssr      experiment=demo_mic_ssr   MIC + SSR, tiny random-weight SAM
  hrda         experiment=demo_hrda      HRDA (tiny): context + detail views, scale attention,
                                         at the synthetic frames' native size (docs/hrda.md)
  mic_ssr_hrda experiment=demo_mic_ssr_hrda  MIC(HRDA) + SSR on HRDA (this project's design)
  oracle       experiment=demo           supervised on the *target* train split with its labels
                                         (the upper bound: the domain gap must be real)
  daformer_no_pl (ablation, on request)  daformer with all pseudo-label weights 0
The oracle reuses the source-only pipeline unchanged: its "source" root is a GTA5-layout view
(`images/`, `labels/*_labelTrainIds.png`, symbolic links) of the target train split, sampled
uniformly (no RCS statistics) and resized at the target's training scale.

Every run is scored on the target val split by `ssr.train`'s final test (the final student,
§8.4). Accuracy varies with the seed, so each method runs for every seed of `--seeds` and the table
reports mean ± sample std (`ssr.report`'s statistics); claim an order between two methods only
where the gap exceeds the spread. The JSON keeps every run (mIoU, aAcc, per-class IoU, wall time
from process start to exit, the mean pseudo-label weight of the last 50 steps) and the summary.
Runs are independent processes: `--jobs 2` runs two at a time (one thread each), with the same
results as one at a time; `--reuse` keeps the runs of `--log-dir` that finished (an interrupted
sweep continues).

Run: python benchmarks/uda_synthetic.py [--steps 600] [--seeds 0 1 2] [--methods source_only oracle]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ssr.data.synthetic import generate_prepared
from ssr.errors import UserError
from ssr.io import atomic_write_json
from ssr.report import Group, Run
from ssr.run.cli import cli

ROOT = Path(__file__).resolve().parents[1]

# name -> (experiment file, overrides, label in the table); {oracle} is the target train view.
METHODS: dict[str, tuple[str, dict[str, str], str]] = {
    "source_only": ("demo", {}, "Source-only"),
    "daformer": ("demo_daformer", {}, "DAFormer (DACS + RCS)"),
    "mic": ("demo_mic", {}, "MIC(DAFormer)"),
    "ssr": ("demo_ssr", {}, "SSR(DAFormer), tiny random SAM"),
    "mic_ssr": ("demo_mic_ssr", {}, "MIC + SSR, tiny random SAM"),
    "hrda": ("demo_hrda", {}, "HRDA (context + detail views)"),
    "mic_ssr_hrda": ("demo_mic_ssr_hrda", {}, "MIC(HRDA) + SSR, tiny random SAM"),
    "oracle": (
        "demo",
        {
            "data.source_root": "{oracle}",
            "data.rcs": "null",  # the view has no RCS statistics: uniform sampling
            "data.source_resize": "${data.target_resize}",  # train at the target's scale
            "task_name": "demo_oracle",
        },
        "Oracle (target-supervised)",
    ),
    # Ablation, not run by default: DACS with every pseudo-label weight 0 (no confidence reaches
    # 1.5), i.e. ClassMix + strong augmentation + mixed-batch normalisation statistics only;
    # the difference to `daformer` is what the pseudo-labels themselves add.
    "daformer_no_pl": (
        "demo_daformer",
        {"uda.teacher.threshold": "1.5", "task_name": "demo_daformer_no_pl"},
        "DAFormer, pseudo-label weight 0 (ablation)",
    ),
}
DEFAULT = ["source_only", "daformer", "mic", "ssr", "mic_ssr", "hrda", "mic_ssr_hrda", "oracle"]


class BenchmarkError(UserError):
    """A run failed; the message names it and its log."""


def oracle_view(cityscapes: Path, out: Path) -> Path:
    """GTA5-layout links to the target train images and their train-id labels (the oracle data)."""
    images, labels = out / "images", out / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    pairs = 0
    for img in sorted((cityscapes / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png")):
        stem = img.name.removesuffix("_leftImg8bit.png")
        lbl = cityscapes / "gtFine" / "train" / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not lbl.is_file():
            raise BenchmarkError(f"{lbl} missing; run python -m ssr.data.prepare cityscapes")
        for link, target in (
            (images / f"{stem}.png", img),
            (labels / f"{stem}_labelTrainIds.png", lbl),
        ):
            link.unlink(missing_ok=True)
            link.symlink_to(target.resolve())
        pairs += 1
    if pairs == 0:
        raise BenchmarkError(f"no target train images under {cityscapes}/leftImg8bit/train")
    return out


def last_pl_weight(run_dir: Path, last: int = 50) -> float | None:
    """Mean logged `train/pl_weight` of the last `last` steps (None for runs without it)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        values = [
            float(r["train/pl_weight"]) for r in csv.DictReader(f) if r.get("train/pl_weight")
        ]
    return sum(values[-last:]) / len(values[-last:]) if values else None


RECORD = "benchmark_run.json"  # in each run dir: what `run` returned, for --reuse


def run(name: str, seed: int, args: argparse.Namespace, oracle: Path) -> dict[str, Any]:
    experiment, extra, _ = METHODS[name]
    run_dir = args.log_dir / f"{name}_s{seed}_{args.steps}steps"
    if args.reuse and (run_dir / RECORD).is_file():
        return json.loads((run_dir / RECORD).read_text())
    settings = {
        "experiment": experiment,
        "seed": str(seed),
        "trainer.max_steps": str(args.steps),
        "trainer.val_check_interval": str(args.steps),
        "data.source_root": str(args.data / "gta"),
        "data.target_root": str(args.data / "cityscapes"),
        **{k: v.replace("{oracle}", str(oracle)) for k, v in extra.items()},
    }
    overrides = [f"{k}={v}" for k, v in settings.items()] + [f"hydra.run.dir={run_dir}"]
    log = run_dir.with_suffix(".log")
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or earlier run of this benchmark
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "ssr.train", *overrides], cwd=ROOT, stdout=f, stderr=f
        ).returncode
    seconds = time.perf_counter() - start
    metrics = run_dir / "metrics.json"
    if rc != 0 or not metrics.is_file():
        raise BenchmarkError(f"{name} seed {seed} failed (exit {rc}); see {log}")
    result = json.loads(metrics.read_text())
    record = {
        "experiment": experiment,
        "overrides": [_rel(o) for o in overrides[1:-1]],
        "mIoU": result["mIoU"],
        "aAcc": result["aAcc"],
        "IoU": result["IoU"],
        "wall_s": round(seconds, 1),
        "pl_weight_last50": last_pl_weight(run_dir),
        "run_dir": _rel(str(run_dir)),
    }
    atomic_write_json(run_dir / RECORD, record)
    return record


def _rel(text: str) -> str:
    """Paths inside the repository written relative to it (the JSON is committed)."""
    return text.replace(f"{ROOT}/", "")


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Mean ± sample std of mIoU and aAcc per method, with `ssr.report`'s statistics, from the
    report's own records (an extended report's earlier run folders may be gone)."""
    summary = {}
    for name, per_seed in report["results"].items():
        group = Group(name)
        for seed, r in per_seed.items():
            group.runs.append(
                Run(r["run_dir"], name, int(seed), r["mIoU"], r["aAcc"], r["IoU"], None)
            )
        stats = {m: group.stat(m) for m in ("mIoU", "aAcc")}
        summary[name] = {
            "seeds": sorted(int(s) for s in per_seed),
            **{m: {"mean": mean, "std": std} for m, (mean, std, _) in stats.items()},
        }
    return summary


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    base = summary.get("source_only", {}).get("mIoU", {}).get("mean")
    lines = [
        f"Synthetic shift, tiny models, {report['steps']} steps, target val "
        f"({report['data']['num_target_val']} images), mean ± std over seeds {report['seeds']}",
        "",
        "| method | experiment | target mIoU | Δ vs source-only | aAcc |",
        "|---|---|---:|---:|---:|",
    ]
    for name, (experiment, _, label) in METHODS.items():
        if name not in summary:
            continue
        miou, aacc = summary[name]["mIoU"], summary[name]["aAcc"]
        delta = "" if base is None or name == "source_only" else f"{miou['mean'] - base:+.1f}"
        lines.append(f"| {label} | `{experiment}` | {_pm(miou)} | {delta} | {_pm(aacc)} |")
    return "\n".join(lines)


def _pm(stat: dict[str, float | None]) -> str:
    return f"{stat['mean']:.1f}" + ("" if stat["std"] is None else f" ± {stat['std']:.1f}")


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "uda_synthetic.json"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "logs" / "uda_synthetic")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument(
        "--reuse", action="store_true", help="keep runs of --log-dir that finished (resume a sweep)"
    )
    args = parser.parse_args(argv)
    # absolute(), not resolve(): data/synthetic may be a link, kept as given.
    args.data, args.log_dir = args.data.absolute(), args.log_dir.absolute()
    os.environ["OMP_NUM_THREADS"] = "1"  # tiny tensors: extra threads only contend
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    generate_prepared(args.data)
    data_settings = json.loads((args.data / "synthetic.json").read_text())
    oracle = oracle_view(args.data / "cityscapes", args.log_dir / "oracle_source")
    report: dict[str, Any] = {"results": {}}
    if args.out.is_file():  # extend a report of the same step budget
        previous = json.loads(args.out.read_text())
        if previous.get("steps") == args.steps and "summary" in previous:
            report = previous
    report |= {
        "steps": args.steps,
        "data": data_settings,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }

    def one(name: str, seed: int) -> None:
        result = run(name, seed, args, oracle)
        report["results"].setdefault(name, {})[str(seed)] = result
        print(f"{name} seed {seed}: target mIoU {result['mIoU']:.2f} in {result['wall_s']:.0f} s")

    jobs = [(name, seed) for seed in args.seeds for name in args.methods]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, *job) for job in jobs]:
            future.result()
    report["results"] = {n: report["results"][n] for n in METHODS if n in report["results"]}
    report["seeds"] = sorted({int(s) for r in report["results"].values() for s in r})
    report["summary"] = summarise(report)
    atomic_write_json(args.out, report)
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
