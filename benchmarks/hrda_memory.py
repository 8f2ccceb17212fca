"""Peak memory of one HRDA, MIC(HRDA), SSR-on-HRDA and MIC(HRDA) + SSR training step.

docs/hrda.md §10. The reference HRDA needs 22.5 GB on a Titan RTX (fp32, maintainer's figure);
SSR on HRDA adds a frozen SAM ViT-B on 4 native 1024² crops and the four per-stage fusions on both
views. Each variant runs in its own process (MiT-B5, 1024² crops, batch 2, random weights, the
ImageNet feature distance on with a random "ImageNet" file, SAM ViT-B with random weights, SDPA
fusion) for one optimiser step of `experiment=<name>` through Lightning, and reports:

* `step_peak_bytes`: the process's peak resident memory during the step above its level just
  before it (model, optimiser-free weights and the batch already resident): activations, gradients,
  optimiser state and temporaries -- what a GPU must hold on top of the weights;
* `peak_rss_bytes`: the process's whole peak (weights, SAM, teacher, ImageNet copy, libraries).

On a CUDA device (`--device cuda`) the same fields come from the allocator's counters instead.

    python benchmarks/hrda_memory.py [--experiments hrda ssr_hrda] [--precision 32-true bf16-mixed]
    smoke run (never the committed file):
        --model hrda_tiny --size 128 --experiments hrda mic_hrda --out /tmp/hrda_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from uda_memory import _batch, _compose, _imagenet_file, one_step_trainer

from ssr.io import atomic_write_json
from ssr.train import build_module

EXPERIMENTS = ("hrda", "mic_hrda", "ssr_hrda", "mic_ssr_hrda")


def _rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def one_step(args: argparse.Namespace) -> dict[str, Any]:
    """Build `args.experiment` and train it for one step; memory and time of that step."""
    overrides = [f"experiment={args.experiment}", f"model={args.model}"]
    if args.hr_crop is not None:  # a reduced scale: the detail view keeps half the crop
        overrides.append(f"model.hr_crop_size=[{args.hr_crop},{args.hr_crop}]")
    cfg = _compose(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        weights = _imagenet_file(cfg.model.backbone.variant, Path(tmp))
        overrides.append(f"model.backbone.pretrained={weights}")
        if cfg.uda.get("sam") is not None:
            overrides.append("uda.sam.encoder.checkpoint=null")  # random ViT-B weights
        cfg = _compose(overrides)
        torch.manual_seed(0)
        module = build_module(cfg)
    device = torch.device(args.device)
    trainer = one_step_trainer(args.device, args.precision)
    loader = DataLoader([_batch(args.size, args.batch)], batch_size=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_bytes()
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"step_peak_bytes": peak, "peak_rss_bytes": peak, "seconds": seconds}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"step_peak_bytes": peak_rss - before, "peak_rss_bytes": peak_rss, "seconds": seconds}


def _run_capped(cmd: list[str], cap_bytes: int) -> tuple[int, str, str, bool]:
    """Run `cmd`, killing it once its resident memory passes `cap_bytes` (before the kernel's
    out-of-memory killer picks a process): (exit code, stdout, stderr, whether it was stopped)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        status, stopped = Path(f"/proc/{proc.pid}/status"), False
        while proc.poll() is None:
            try:
                rss_kib = next(
                    int(line.split()[1])
                    for line in status.read_text().splitlines()
                    if line.startswith("VmRSS:")
                )
            except (OSError, StopIteration):  # exiting: no status, or no VmRSS line left
                rss_kib = 0
            if rss_kib * 1024 > cap_bytes:
                proc.kill()
                stopped = True
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return proc.wait(), out.read(), err.read(), stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="hrda_mitb5")
    parser.add_argument("--size", type=int, default=1024, help="square crop side")
    parser.add_argument("--batch", type=int, nargs="+", default=[2], help="batch sizes to run")
    parser.add_argument("--hr-crop", type=int, help="detail view side (default: the model's)")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--rss-cap-gib", type=float, default=20.0, help="stop a variant above this (CPU only)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hrda_memory.json"))
    parser.add_argument("--experiment", help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args(argv)
    if args.experiment is not None:
        args.precision, args.batch = args.precision[0], args.batch[0]
        print(json.dumps(one_step(args)))
        return
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "experiment", "batch")}
    results: dict[str, Any] = {"setup": setup, "steps": []}
    if args.out.is_file():  # extend an earlier report of the same setup
        previous = json.loads(args.out.read_text())
        if previous.get("setup") == setup:
            results["steps"] = previous.get("steps", [])
    cap = int(args.rss_cap_gib * 2**30) if args.device == "cpu" else 2**62
    for batch in args.batch:
        for precision in args.precision:
            for name in args.experiments:
                cmd = [sys.executable, __file__, "--experiment", name, "--precision", precision]
                cmd += ["--device", args.device, "--model", args.model]
                cmd += ["--size", str(args.size), "--batch", str(batch)]
                cmd += [] if args.hr_crop is None else ["--hr-crop", str(args.hr_crop)]
                start = time.perf_counter()
                code, stdout, stderr, stopped = _run_capped(cmd, cap)
                key = {"experiment": name, "precision": precision, "batch": batch}
                if stopped:
                    step = {**key, "over_rss_cap_bytes": cap}
                    step["seconds"] = round(time.perf_counter() - start, 1)
                    print(f"{name:14s} {precision:10s} batch {batch}: over {cap / 2**30:.1f} GiB")
                elif code != 0:
                    print(stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{name} ({precision}) failed with exit code {code}")
                else:
                    step = {**key, **json.loads(stdout.strip().splitlines()[-1])}
                    print(
                        f"{name:14s} {precision:10s} batch {batch}: step peak "
                        f"{step['step_peak_bytes'] / 2**30:6.2f} GiB   process peak "
                        f"{step['peak_rss_bytes'] / 2**30:6.2f} GiB   {step['seconds']:7.1f} s",
                        flush=True,
                    )
                results["steps"] = [
                    s for s in results["steps"] if {k: s[k] for k in key} != key
                ] + [step]
                atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
