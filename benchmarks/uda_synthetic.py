"""Does self-training close the synthetic domain gap? Target-val mIoU per method (issues 2 and 3).

Trains the tiny DAFormer on the synthetic GTA5 -> Cityscapes shift (`ssr.data.synthetic`) with one
seed and one step budget for every method, each as `python -m ssr.train experiment=<name>`:
  source_only  experiment=demo           supervised on the source only (the lower bound)
  daformer     experiment=demo_daformer  DACS self-training + RCS + PL crop (ALGORITHM.md §4)
  mic          experiment=demo_mic       + masked image consistency (§5)
  ssr          experiment=demo_ssr       DAFormer + SSR with a tiny random-weight SAM (§6);
                                         exercises the path, no accuracy claim
  oracle       experiment=demo           supervised on the *target* train split with its labels
                                         (the upper bound; issue 2: "the gap must be real")
  daformer_no_pl (ablation, on request)  daformer with all pseudo-label weights 0
The oracle reuses the source-only pipeline unchanged: its "source" root is a GTA5-layout view
(`images/`, `labels/*_labelTrainIds.png`, symbolic links) of the target train split, sampled
uniformly (no RCS statistics) and resized at the target's training scale.

Every run is scored on the target val split by `ssr.train`'s final test (the final student,
§8.4); the JSON keeps mIoU, aAcc, per-class IoU, wall time (process start to exit, so it includes
~15 s of start-up and the test) and, for self-training, the mean pseudo-label weight of the last
50 steps. An existing output file with the same steps and seed is updated per method.

Run: python benchmarks/uda_synthetic.py [--steps 600] [--seed 0] [--experiments source_only oracle]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ssr.data import prepare
from ssr.data.synthetic import SyntheticDataError, generate

ROOT = Path(__file__).resolve().parents[1]

# name -> (experiment file, overrides, label in the table); {oracle} is the target train view.
METHODS: dict[str, tuple[str, dict[str, str], str]] = {
    "source_only": ("demo", {}, "Source-only"),
    "daformer": ("demo_daformer", {}, "DAFormer (DACS + RCS)"),
    "mic": ("demo_mic", {}, "MIC(DAFormer)"),
    "ssr": ("demo_ssr", {}, "SSR(DAFormer), tiny random SAM"),
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
        {"uda.pseudo_threshold": "1.5", "task_name": "demo_daformer_no_pl"},
        "DAFormer, pseudo-label weight 0 (ablation)",
    ),
}
DEFAULT = ["source_only", "daformer", "mic", "ssr", "oracle"]


def ensure_data(data: Path) -> dict[str, Any]:
    """Synthetic set generated and prepared (idempotent); returns its generator settings."""
    generate(data)
    gta, cityscapes = data / "gta", data / "cityscapes"
    todo = [("gta5", gta)] if not (gta / "sample_class_stats.json").is_file() else []
    if not any((cityscapes / "gtFine").glob("val/*/*_gtFine_labelTrainIds.png")):
        todo.append(("cityscapes", cityscapes))
    for dataset, root in todo:
        if prepare.main([dataset, str(root)]) != 0:
            raise RuntimeError(f"python -m ssr.data.prepare {dataset} {root} failed (see above)")
    return json.loads((data / "synthetic.json").read_text())


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
            raise FileNotFoundError(f"{lbl} missing; run python -m ssr.data.prepare cityscapes")
        for link, target in (
            (images / f"{stem}.png", img),
            (labels / f"{stem}_labelTrainIds.png", lbl),
        ):
            link.unlink(missing_ok=True)
            link.symlink_to(target.resolve())
        pairs += 1
    if pairs == 0:
        raise FileNotFoundError(f"no target train images under {cityscapes}/leftImg8bit/train")
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


def run(name: str, args: argparse.Namespace, oracle: Path) -> dict[str, Any]:
    experiment, extra, _ = METHODS[name]
    run_dir = args.log_dir / f"{name}_s{args.seed}_{args.steps}steps"
    settings = {
        "experiment": experiment,
        "seed": str(args.seed),
        "trainer.max_steps": str(args.steps),
        "trainer.val_check_interval": str(args.steps),
        "data.source_root": str(args.data / "gta"),
        "data.target_root": str(args.data / "cityscapes"),
        **{k: v.replace("{oracle}", str(oracle)) for k, v in extra.items()},
    }
    overrides = [f"{k}={v}" for k, v in settings.items()] + [f"hydra.run.dir={run_dir}"]
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "ssr.train", *overrides], cwd=ROOT, stdout=f, stderr=f
        ).returncode
    seconds = time.perf_counter() - start
    metrics = run_dir / "metrics.json"
    if rc != 0 or not metrics.is_file():
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{name} failed (exit {rc}), log {log}:\n" + "\n".join(tail))
    result = json.loads(metrics.read_text())
    return {
        "experiment": experiment,
        "overrides": [_rel(o) for o in overrides[1:-1]],
        "mIoU": result["mIoU"],
        "aAcc": result["aAcc"],
        "IoU": result["IoU"],
        "wall_s": round(seconds, 1),
        "pl_weight_last50": last_pl_weight(run_dir),
        "run_dir": _rel(str(run_dir)),
    }


def _rel(text: str) -> str:
    """Paths inside the repository written relative to it (the JSON is committed)."""
    return text.replace(f"{ROOT}/", "")


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    base = results.get("source_only", {}).get("mIoU")
    lines = [
        f"Synthetic shift, tiny DAFormer, {report['steps']} steps, seed {report['seed']}, "
        f"target val ({report['data']['num_target_val']} images)",
        "",
        "| method | experiment | target mIoU | Δ vs source-only | wall time |",
        "|---|---|---:|---:|---:|",
    ]
    for name, (experiment, _, label) in METHODS.items():
        if name not in results:
            continue
        r = results[name]
        delta = "" if base is None or name == "source_only" else f"{r['mIoU'] - base:+.2f}"
        lines.append(
            f"| {label} | `{experiment}` | {r['mIoU']:.2f} | {delta} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiments", nargs="+", choices=list(METHODS), default=DEFAULT)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "uda_synthetic.json"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "logs" / "uda_synthetic")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP threads per run (1: see scripts/demo.py)"
    )
    args = parser.parse_args(argv)
    # absolute(), not resolve(): data/synthetic may be a link, kept as given.
    args.data, args.log_dir = args.data.absolute(), args.log_dir.absolute()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    try:
        data_settings = ensure_data(args.data)
        oracle = oracle_view(args.data / "cityscapes", args.log_dir / "oracle_source")
    except (SyntheticDataError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"results": {}}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if (previous.get("steps"), previous.get("seed")) == (args.steps, args.seed):
            report = previous
    report |= {
        "steps": args.steps,
        "seed": args.seed,
        "data": data_settings,
        "threads": args.threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    for name in args.experiments:
        print(f"{name}: training {METHODS[name][0]} for {args.steps} steps ...", flush=True)
        try:
            report["results"][name] = run(name, args, oracle)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        r = report["results"][name]
        print(f"{name}: target mIoU {r['mIoU']:.2f} in {r['wall_s']:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every run: partial OK
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
