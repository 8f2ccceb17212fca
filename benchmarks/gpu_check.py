"""One-command GPU check: the paper-scale step benchmark in fp32 and bf16-mixed, a 50-step
`experiment=mic_ssr` run on synthetic data at the paper's crop size (random weights), and its
evaluation -- to catch device and dtype bugs (SAM on the wrong device, a dtype clash under
autocast, the AMP scaler) in minutes, before a 40k-iteration run. Results:
`<out-dir>/gpu_paper_scale_<precision>.json`, `gpu_check.json` and a Markdown summary
`gpu_check.md`.

    python benchmarks/gpu_check.py                  # on one CUDA GPU, about 8 minutes
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
PRECISIONS = ("32-true", "bf16-mixed")


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(f"{what}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return proc


def paper_scale(args: argparse.Namespace, precision: str) -> dict[str, Any] | None:
    out = args.out_dir / f"gpu_paper_scale_{precision.split('-')[0]}.json"
    cmd = [sys.executable, str(HERE / "paper_scale.py"), "--device", args.device]
    cmd += ["--precision", precision, "--experiments", *args.experiments, "--out", str(out)]
    if args.smoke:
        cmd += ["--model", "daformer_tiny", "--sam", "tiny", "--size", "64"]
    proc = _run(cmd, f"paper-scale steps, {precision}")
    return json.loads(out.read_text())["summary"] if proc.returncode == 0 else None


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


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}", ""]
    for precision, summary in report["paper_scale"].items():
        lines += [f"## Paper-scale steps, {precision}", ""]
        if summary is None:
            lines += ["failed (see the console)", ""]
            continue
        lines += ["| experiment | step (s) |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in summary["median_seconds"].items()]
        for key, value in summary.items():
            if "/" in key and "ratio" in value:
                eff = value.get("efficiency")
                extra = "" if eff is None else f", SSR overhead efficiency {eff:.2f}"
                lines.append(f"\n{key}: {value['ratio']:.2f}x{extra}")
        lines.append("")
    run = report["short_run"]
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
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.experiments = "cpu", [e for e in args.experiments if "hrda" not in e]
        precisions = ("32-true",)
    elif not torch.cuda.is_available():
        print("no CUDA GPU here; run with --smoke to check the path on the CPU", file=sys.stderr)
        return 2
    else:
        args.device, precisions = "cuda", PRECISIONS
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (smoke)"
    report: dict[str, Any] = {"device": device, "torch": torch.__version__, "paper_scale": {}}
    start = time.perf_counter()
    for precision in precisions:
        report["paper_scale"][precision] = paper_scale(args, precision)
    with tempfile.TemporaryDirectory() as tmp:
        report["short_run"] = short_run(args, Path(tmp))
    report["seconds"] = time.perf_counter() - start
    atomic_write_json(args.out_dir / "gpu_check.json", report)
    atomic_write_text(args.out_dir / "gpu_check.md", markdown(report))
    print(markdown(report))
    failed = any(v is None for v in report["paper_scale"].values())
    failed |= report["short_run"]["train_exit"] != 0 or report["short_run"].get("eval_exit") != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
