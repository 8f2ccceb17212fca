"""One-command GPU check: the paper-scale step benchmark in fp32 and bf16-mixed, a 50-step
`experiment=mic_ssr` run on synthetic data at the paper's crop size (random weights) and its
evaluation -- to catch device and dtype bugs (SAM on the wrong device, a dtype clash under
autocast, the AMP scaler, host syncs inside the step) in minutes, before a 40k-iteration run --
then, as time allows, the settings of the README's memory table and the speed modes (`extras`).
Results: `<out-dir>/gpu_paper_scale_{32,bf16,extras}.json` (+ operator profiles of one daformer
and one ssr step), `gpu_check.json` and a Markdown summary `gpu_check.md`, rewritten after each
part so that an interrupted check keeps what it measured.

    python benchmarks/gpu_check.py                  # on one CUDA GPU, about 8 minutes
    python benchmarks/gpu_check.py --parts extras   # one part (run fp32 bf16 extras), added to
                                                    # an earlier gpu_check.json in --out-dir
    python benchmarks/gpu_check.py --smoke          # the same path on the CPU, tiny sizes (tests)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ssr.data.synthetic import generate_prepared
from ssr.io import atomic_write_json, atomic_write_text

HERE = Path(__file__).resolve().parent
EXPERIMENTS = ("daformer", "ssr", "mic", "mic_ssr", "hrda", "ssr_hrda")
PARTS = {"run": None, "fp32": "32-true", "bf16": "bf16-mixed", "extras": "bf16-mixed"}
# The memory table's settings and the speed modes, as variants of the bf16 step; the compiled
# ones last (their first step compiles for a minute or more), so a time limit cuts them first.
EXTRAS = (
    "mic_ssr:uda.single_backward=true",
    "mic_ssr:uda.sam.attention=explicit",
    "daformer:uda.channels_last=true",
    "ssr:uda.channels_last=true",
    "daformer:uda.compile=true",
    "ssr:uda.compile=true,uda.sam.encoder.compile=true",
)


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(f"{what}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return proc


def paper_scale(args: argparse.Namespace, part: str, deadline: float) -> dict[str, Any] | None:
    """One part's steps (`paper_scale.py`, a process per experiment): its summary, or None."""
    out = args.out_dir / f"gpu_paper_scale_{part}.json"
    experiments = (
        args.experiments
        if part != "extras"
        else [
            e
            for e in EXTRAS
            if not (args.smoke and "compile" in e)  # compiling: slow on a CPU
        ]
    )
    cmd = [sys.executable, str(HERE / "paper_scale.py"), "--device", args.device]
    cmd += ["--precision", PARTS[part], "--experiments", *experiments, "--out", str(out)]
    cmd += ["--time-limit", str(max(0.0, deadline - time.perf_counter()))]
    if args.device == "cuda":  # past kernel selection and allocator growth
        cmd += ["--warmup", "2", "--steps", "3"]
    if part == "fp32":
        cmd += ["--profile", "daformer", "ssr"]
    if args.smoke:
        cmd += ["--model", "daformer_tiny", "--sam", "tiny", "--size", "64"]
    _run(cmd, f"paper-scale steps, {part}")
    if not out.is_file():
        return None
    result = json.loads(out.read_text())
    steps = {s["experiment"]: s for s in result["steps"]}
    summary = result.get("summary", {})
    summary["host_syncs"] = {n: s["host_syncs"] for n, s in steps.items() if "host_syncs" in s}
    summary["skipped"] = result.get("skipped", [])
    return summary


def short_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """`experiment=mic_ssr` for a few steps on synthetic data, then `ssr.eval` of its checkpoint."""
    data = tmp / "synthetic"
    generate_prepared(data, num_source=16, num_target_train=8, num_target_val=4)
    run = tmp / "run"
    train = [sys.executable, "-m", "ssr.train", "experiment=mic_ssr", f"hydra.run.dir={run}"]
    train += [f"data.source_root={data / 'gta'}", f"data.target_root={data / 'cityscapes'}"]
    train += ["model.backbone.pretrained=null", "uda.fd=null", "uda.sam.encoder.checkpoint=null"]
    train += [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    train += ["data.rcs.min_pixels=10", "logger=csv", "callbacks.debug_images=null"]
    if args.smoke:  # the paper's code path at CPU size
        train += ["trainer=cpu", "model=daformer_tiny", "uda/sam=tiny", "data.crop_size=[64,64]"]
        train += ["data.source_resize=[160,90]", "data.target_resize=[128,64]"]
        train += ["inference.resize=[128,64]", "data.num_workers=0"]
        train += ["uda.teacher.ignore_top=2", "uda.teacher.ignore_bottom=15"]  # 15/120 of 512
    else:  # the synthetic frames upsampled to the paper's sizes, 512² crops, mixed precision
        train += ["trainer=gpu"]
    result: dict[str, Any] = {"steps": args.steps}
    proc = _run(train, f"{args.steps}-step mic_ssr run")
    result["train_exit"] = proc.returncode
    if proc.returncode != 0:
        result["train_error"] = proc.stderr.strip().splitlines()[-1:]
        return result
    result["train_mIoU"] = json.loads((run / "metrics.json").read_text())["mIoU"]
    evaluate = [sys.executable, "-m", "ssr.eval", f"ckpt_path={run / 'checkpoints/last.ckpt'}"]
    evaluate += [f"gt_root={data / 'cityscapes'}", f"output_dir={tmp / 'eval'}", "num_workers=0"]
    evaluate += [f"hydra.run.dir={tmp / 'eval_run'}", f"device={args.device}"]
    if args.smoke:
        evaluate += ["inference.resize=[128,64]"]
    proc = _run(evaluate, "evaluation of its checkpoint")
    result["eval_exit"] = proc.returncode
    if proc.returncode == 0:
        result["eval_mIoU"] = json.loads((tmp / "eval" / "metrics.json").read_text())["mIoU"]
    return result


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}", ""]
    for part, summary in report["paper_scale"].items():
        lines += [f"## Paper-scale steps, {part} ({PARTS[part]})", ""]
        if summary is None:
            lines += ["failed (see the console)", ""]
            continue
        lines += ["| experiment | step (s) | peak (GiB) | host syncs / step |"]
        lines += ["|---|---:|---:|---:|"]
        for name, seconds in summary["median_seconds"].items():
            syncs = summary["host_syncs"].get(name, "—")
            peak = _gib(summary["peak_bytes"][name])
            lines.append(f"| {name} | {seconds:.3f} | {peak} | {syncs} |")
        for name in summary.get("failed", []) + summary.get("skipped", []):
            why = "failed" if name in summary.get("failed", []) else "skipped (time)"
            lines.append(f"| {name} | {why} | | |")
        for key, value in summary.items():
            if "/" in key and "ratio" in value:
                extra = ""
                if value.get("efficiency") is not None:
                    floor = value["floor_seconds"]
                    fusion = f", of which fusion {floor['fusion']:.3f}" if "fusion" in floor else ""
                    extra = (
                        f"; overhead {value['overhead_seconds']:.3f} s vs floor "
                        f"{floor['floor']:.3f} s (SAM {floor['sam_forward']:.3f} + branches "
                        f"{floor['branches']:.3f}{fusion}): efficiency {value['efficiency']:.2f}"
                    )
                lines.append(f"\n{key}: {value['ratio']:.2f}x{extra}")
        lines.append("")
    run = report.get("short_run")
    if run is not None:
        lines += [f"## {run['steps']}-step mic_ssr run", ""]
        lines.append(f"train exit {run['train_exit']}, eval exit {run.get('eval_exit', '—')}")
        if "eval_mIoU" in run:
            lines.append(
                f"mIoU after training {run['train_mIoU']:.2f}, re-evaluated {run['eval_mIoU']:.2f}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the path alone")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--time-limit", type=float, default=480, help="seconds for all parts")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    parts = list(args.parts)
    if args.smoke:
        args.device, args.experiments = "cpu", [e for e in args.experiments if "hrda" not in e]
        parts = [p for p in parts if p != "bf16"]
    elif not torch.cuda.is_available():
        print("no CUDA GPU here; run with --smoke to check the path on the CPU", file=sys.stderr)
        return 2
    else:
        args.device = "cuda"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (smoke)"
    report: dict[str, Any] = {"device": device, "torch": torch.__version__, "paper_scale": {}}
    earlier = args.out_dir / "gpu_check.json"
    if earlier.is_file() and json.loads(earlier.read_text())["device"] == device:
        report = json.loads(earlier.read_text())  # add this run's parts to an earlier check's
    start = time.perf_counter()
    deadline = start + args.time_limit
    for part in parts:
        part_start = time.perf_counter()
        if part == "run":
            with tempfile.TemporaryDirectory() as tmp:
                report["short_run"] = short_run(args, Path(tmp))
        else:
            report["paper_scale"][part] = paper_scale(args, part, deadline)
        report.setdefault("seconds", {})[part] = time.perf_counter() - part_start
        atomic_write_json(args.out_dir / "gpu_check.json", report)
        atomic_write_text(args.out_dir / "gpu_check.md", markdown(report))
    print(markdown(report))
    failed = any(v is None or v.get("failed") for v in report["paper_scale"].values())
    run = report.get("short_run")
    failed |= run is not None and (run["train_exit"] != 0 or run.get("eval_exit") != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
