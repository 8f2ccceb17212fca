"""One training step of each experiment at paper scale, side by side, and SSR's overhead against
the floor the method itself sets.

Paper sizes (the experiment's own model: MiT-B5 with the DAFormer or HRDA head; 512² crops, or
1024² for HRDA; batch 2; SAM ViT-B on 1024² inputs), random weights (a random "ImageNet" file so
that FD runs, a random SAM), one child process per step, experiments round-robin, so load drift
on a shared machine spreads over all of them. Per step: wall time and the process's peak memory
above its level before the step. For the SSR experiments the same child then measures, alone and
on the same batch, what SSR adds by its definition (docs/method.md §6): SAM's forward on the
source and mixed crops (one call) and, for each of the two, the fusion of the four stages, the
extra decode-head pass and their backward down to the backbone features. floor = SAM + both
branches; overhead = step(ssr experiment) - step(its base); efficiency = floor / overhead (1.0:
nothing beyond the method's own work).

    python benchmarks/paper_scale.py [--experiments daformer ssr mic mic_ssr] [--rounds 1]
                                     [--device cpu|cuda] [--precision 32-true]
                                     [--warmup 0] [--steps 1] [--profile ssr]
    a setting as its own variant: --experiments mic_ssr mic_ssr:uda.single_backward=true

On a GPU the first steps pay for kernel selection and allocator growth: `--warmup 2 --steps 3`
times the median of three steps after two untimed ones (the floor likewise), counts the host
syncs of one more step (`torch.cuda.set_sync_debug_mode`) and reports the allocator's peak
(weights included; on the CPU the peak is the step's, above the process before it).
    smoke run (never the committed file):
        --model daformer_tiny --sam tiny --size 64 --out /tmp/paper_scale.json
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hrda_memory import _rss_bytes
from ssr_cost_parts.common import StepTimer, sync, timed
from torch.utils.data import DataLoader
from uda_memory import _batch, _compose, _imagenet_file, one_step_trainer

from ssr.io import atomic_write_json, atomic_write_text
from ssr.run.cli import set_matmul_precision
from ssr.train import build_module

EXPERIMENTS = ("daformer", "ssr", "mic", "mic_ssr")
BASE = {"ssr": "daformer", "mic_ssr": "mic", "ssr_hrda": "hrda", "mic_ssr_hrda": "mic_hrda"}


def _median_time(fn: Any, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def ssr_floor(
    module: Any, batch: dict[str, Any], device: torch.device, warmup: int = 0, repeats: int = 1
) -> dict[str, float]:
    """What SSR adds by definition, measured alone: SAM on both crops, then per branch (source,
    mixed) fusion + decode head + loss, forward and backward to the backbone features; the
    fusions are also timed alone (`decode` = branches - fusion)."""
    sam, model = module.sam, module.model
    xs, xt = batch["src_img"].to(device), batch["tgt_img"].to(device)
    label = batch["src_lbl"].to(device)
    out: dict[str, float] = {}
    pair = lambda: sam.encoder.encode_pair(xs, xt)  # noqa: E731
    out["sam_forward"] = _median_time(pair, device, warmup, repeats)
    sam_src, _ = pair()
    with torch.no_grad():
        views = model.train_views(xs)
        feats = [[f.detach() for f in model.features(v.image)] for v in views]

    def branch() -> None:
        leaves = [[f.clone().requires_grad_(True) for f in fs] for fs in feats]
        loss, _ = sam.enhanced_loss(model, views, leaves, sam_src, label)
        loss.backward()

    def fusion() -> None:  # the branches' fusions alone (the rest of a branch is its decode)
        leaves = [[f.clone().requires_grad_(True) for f in fs] for fs in feats]
        fused = [sam.fuse(fs, sam_src) for fs in leaves]
        sum(t.float().sum() for fs in fused for t in fs).backward()

    out["branches"] = 2 * _median_time(
        branch, device, warmup, repeats
    )  # the source and mixed batch
    out["fusion"] = 2 * _median_time(fusion, device, warmup, repeats)
    out["decode"] = out["branches"] - out["fusion"]
    out["floor"] = out["sam_forward"] + out["branches"]
    return out


class SyncCounter(pl.Callback):
    """Counts the host syncs of one training step (`torch.cuda.set_sync_debug_mode`): each one
    stalls the CPU until the GPU's queue drains."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode(0)


class StepProfile(pl.Callback):
    """`torch.profiler` over one training step: its most expensive operators, as a table."""

    def __init__(self, step: int, device: torch.device) -> None:
        self.step, self.table = step, ""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.profiler = torch.profiler.profile(activities=activities)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            sync(pl_module.device)
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            self.table = averages.table(sort_by=self.sort, row_limit=30, max_name_column_width=60)


def one_step(args: argparse.Namespace) -> dict[str, Any]:
    """Build `args.experiment` (`name[:override,...]`) at paper scale and train it for warm-up +
    timed steps; time, memory, host syncs, SSR's floor."""
    name, _, extra = args.experiment.partition(":")
    overrides = [f"experiment={name}"] + ([f"model={args.model}"] if args.model else [])
    cfg = _compose(overrides)
    if cfg.uda.get("sam") is not None and args.sam == "tiny":
        overrides.append("uda/sam=tiny")
    overrides += [o for o in extra.split(",") if o]
    with tempfile.TemporaryDirectory() as tmp:
        weights = _imagenet_file(cfg.model.backbone.variant, Path(tmp))
        overrides.append(f"model.backbone.pretrained={weights}")
        if cfg.uda.get("sam") is not None:
            overrides.append("uda.sam.encoder.checkpoint=null")  # random weights
        cfg = _compose(overrides)
        set_matmul_precision(cfg.float32_matmul_precision)  # as ssr.train: TF32 on GPUs
        torch.manual_seed(0)
        module = build_module(cfg)
    device = torch.device(args.device)
    size = args.size or int(cfg.data.crop_size[0])
    batch = _batch(size, 2)
    timed = range(args.warmup, args.warmup + args.steps)
    callbacks: list[pl.Callback] = [timer := StepTimer()]  # optimiser steps, not the set-up
    extra_steps = 0
    if device.type == "cuda":
        callbacks.append(SyncCounter(timed.stop + extra_steps))
        extra_steps += 1
    if args.profile and args.experiment in args.profile:
        callbacks.append(profile := StepProfile(timed.stop + extra_steps, device))
        extra_steps += 1
    total = timed.stop + extra_steps
    trainer = one_step_trainer(args.device, args.precision, callbacks, max_steps=total)
    before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader([batch] * total, batch_size=None))
    seconds = [timer.wall[i] / 1e3 for i in timed]
    result: dict[str, Any] = {"seconds": statistics.median(seconds), "crop": size}
    result["timed_seconds"] = seconds
    # what a GPU holds before the step: student, teacher, ImageNet copy, SAM (fp32 weights)
    tensors = [*module.parameters(), *module.buffers()]
    result["weights_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda":  # the allocator's peak, weights and optimiser state included
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        result["host_syncs"] = len(syncs)
        result["host_sync_sites"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    else:
        result["step_peak_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        )
    if args.profile and args.experiment in args.profile:
        result["profile"] = profile.table
    if module.sam is not None:
        module.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            result["floor"] = ssr_floor(module, batch, device, args.warmup, args.steps)
    return result


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median step per experiment; ratios and SSR's overhead efficiency against its base."""
    by: dict[str, list[dict[str, Any]]] = {}
    for step in steps:
        if "error" not in step:
            by.setdefault(step["experiment"], []).append(step)
    median = {name: statistics.median(s["seconds"] for s in runs) for name, runs in by.items()}
    out: dict[str, Any] = {"median_seconds": median}
    out["peak_bytes"] = {
        n: max(s.get("peak_allocated_bytes", s.get("step_peak_bytes", 0)) for s in runs)
        for n, runs in by.items()
    }
    failed = sorted({s["experiment"] for s in steps if "error" in s})
    if failed:
        out["failed"] = failed
    for name, base in BASE.items():
        if name in median and base in median:
            floors = [s["floor"] for s in by[name] if "floor" in s]
            floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
            overhead = median[name] - median[base]
            out[f"{name}/{base}"] = {
                "ratio": median[name] / median[base],
                "overhead_seconds": overhead,
                "floor_seconds": floor,
                "rest_seconds": overhead - floor["floor"],  # beyond the method's own work
                "efficiency": floor["floor"] / overhead if overhead > 0 else None,
            }
    if "hrda" in median and "daformer" in median:
        out["hrda/daformer"] = {"ratio": median["hrda"] / median["daformer"]}
    return out


def run_child(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """One experiment's steps in a fresh process; a failure is recorded, not fatal."""
    cmd = [sys.executable, __file__, "--experiment", name, "--device", args.device]
    cmd += ["--precision", args.precision, "--sam", args.sam]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += [] if args.model is None else ["--model", args.model]
    cmd += [] if args.size is None else ["--size", str(args.size)]
    cmd += [] if not args.profile else ["--profile", *args.profile]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        raised = [i for i, line in enumerate(lines) if re.match(r"[\w.]+(Error|Exception)\b", line)]
        return {"error": " ".join(lines[raised[-1] if raised else -1 :])}  # the exception's text
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--rounds", type=int, default=1, help="child processes per experiment")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (GPU: 2)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per child (median)")
    parser.add_argument("--profile", nargs="*", help="experiments to profile one more step of")
    parser.add_argument("--time-limit", type=float, help="seconds: launch no child after these")
    parser.add_argument("--model", help="override every experiment's model (smoke runs)")
    parser.add_argument("--sam", default="vit_b", choices=["vit_b", "tiny"])
    parser.add_argument("--size", type=int, help="crop side (default: the experiment's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_scale.json"))
    parser.add_argument("--experiment", help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args(argv)
    if args.experiment is not None:
        print(json.dumps(one_step(args)))
        return 0
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "experiment")}
    results: dict[str, Any] = {"setup": setup, "steps": []}
    start = time.perf_counter()
    for round_ in range(args.rounds):
        for name in args.experiments:
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                print(f"{name:14s} round {round_}: skipped (--time-limit)", flush=True)
                results.setdefault("skipped", []).append(name)
                continue
            step = {"experiment": name, "round": round_, **run_child(args, name)}
            if "profile" in step:
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # `mic_ssr:a=b` -> a file name
                table = args.out.with_name(f"{args.out.stem}_profile_{slug}.txt")
                atomic_write_text(table, step.pop("profile") + "\n")
            results["steps"].append(step)
            if "error" in step:
                print(f"{name:14s} round {round_}: FAILED: {step['error']}", flush=True)
            else:
                peak = step.get("peak_allocated_bytes", step.get("step_peak_bytes", 0))
                floor = step.get("floor", {}).get("floor")
                extra = "" if floor is None else f"   SSR floor {floor:7.2f} s"
                syncs = "" if "host_syncs" not in step else f"   host syncs {step['host_syncs']}"
                print(
                    f"{name:14s} round {round_}: {step['seconds']:7.2f} s   peak "
                    f"{peak / 2**30:6.2f} GiB{extra}{syncs}",
                    flush=True,
                )
            results["summary"] = summarise(results["steps"])
            atomic_write_json(args.out, results)
    results["summary"] = summarise(results["steps"])
    atomic_write_json(args.out, results)
    print(json.dumps(results["summary"], indent=1))
    return 1 if "failed" in results["summary"] else 0


if __name__ == "__main__":
    sys.exit(main())
