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
    smoke run (never the committed file):
        --model daformer_tiny --sam tiny --size 64 --out /tmp/paper_scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hrda_memory import _rss_bytes
from ssr_cost_parts.common import StepTimer, sync
from torch.utils.data import DataLoader
from uda_memory import _batch, _compose, _imagenet_file, one_step_trainer

from ssr.io import atomic_write_json
from ssr.train import build_module

EXPERIMENTS = ("daformer", "ssr", "mic", "mic_ssr")
BASE = {"ssr": "daformer", "mic_ssr": "mic", "ssr_hrda": "hrda", "mic_ssr_hrda": "mic_hrda"}


def _timed(fn: Any, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def ssr_floor(module: Any, batch: dict[str, Any], device: torch.device) -> dict[str, float]:
    """What SSR adds by definition, measured alone: SAM on both crops, then per branch (source,
    mixed) fusion + decode head + loss, forward and backward to the backbone features."""
    sam, model = module.sam, module.model
    xs, xt = batch["src_img"].to(device), batch["tgt_img"].to(device)
    label = batch["src_lbl"].to(device)
    out: dict[str, float] = {}
    out["sam_forward"] = _timed(lambda: sam.encoder.encode_pair(xs, xt), device)
    sam_src, _ = sam.encoder.encode_pair(xs, xt)
    with torch.no_grad():
        views = model.train_views(xs)
        feats = [[f.detach() for f in model.features(v.image)] for v in views]

    def branch() -> None:
        leaves = [[f.clone().requires_grad_(True) for f in fs] for fs in feats]
        loss, _ = sam.enhanced_loss(model, views, leaves, sam_src, label)
        loss.backward()

    out["branches"] = 2 * _timed(branch, device)  # the source and the mixed batch
    out["floor"] = out["sam_forward"] + out["branches"]
    return out


def one_step(args: argparse.Namespace) -> dict[str, Any]:
    """Build `args.experiment` at paper scale and train one step; time, memory, SSR's floor."""
    overrides = [f"experiment={args.experiment}"] + ([f"model={args.model}"] if args.model else [])
    cfg = _compose(overrides)
    if cfg.uda.get("sam") is not None and args.sam == "tiny":
        overrides.append("uda/sam=tiny")
    with tempfile.TemporaryDirectory() as tmp:
        weights = _imagenet_file(cfg.model.backbone.variant, Path(tmp))
        overrides.append(f"model.backbone.pretrained={weights}")
        if cfg.uda.get("sam") is not None:
            overrides.append("uda.sam.encoder.checkpoint=null")  # random weights
        cfg = _compose(overrides)
        torch.manual_seed(0)
        module = build_module(cfg)
    device = torch.device(args.device)
    size = args.size or int(cfg.data.crop_size[0])
    batch = _batch(size, 2)
    timer = StepTimer()  # the optimiser step alone, not the trainer's set-up
    trainer = one_step_trainer(args.device, args.precision, [timer])
    before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    result: dict[str, Any] = {"seconds": timer.wall[0] / 1e3, "crop": size}
    # what a GPU holds before the step: student, teacher, ImageNet copy, SAM (fp32 weights)
    tensors = [*module.parameters(), *module.buffers()]
    result["weights_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda":
        result["step_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["step_peak_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        )
    if module.sam is not None:
        module.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            result["floor"] = ssr_floor(module, batch, device)
    return result


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median step per experiment; ratios and SSR's overhead efficiency against its base."""
    by: dict[str, list[dict[str, Any]]] = {}
    for step in steps:
        by.setdefault(step["experiment"], []).append(step)
    median = {name: statistics.median(s["seconds"] for s in runs) for name, runs in by.items()}
    out: dict[str, Any] = {"median_seconds": median}
    for name, base in BASE.items():
        if name in median and base in median:
            floors = [s["floor"] for s in by[name] if "floor" in s]
            floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
            overhead = median[name] - median[base]
            out[f"{name}/{base}"] = {
                "ratio": median[name] / median[base],
                "overhead_seconds": overhead,
                "floor_seconds": floor,
                "efficiency": floor["floor"] / overhead if overhead > 0 else None,
            }
    if "hrda" in median and "daformer" in median:
        out["hrda/daformer"] = {"ratio": median["hrda"] / median["daformer"]}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--rounds", type=int, default=1, help="steps per experiment")
    parser.add_argument("--model", help="override every experiment's model (smoke runs)")
    parser.add_argument("--sam", default="vit_b", choices=["vit_b", "tiny"])
    parser.add_argument("--size", type=int, help="crop side (default: the experiment's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_scale.json"))
    parser.add_argument("--experiment", help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args(argv)
    if args.experiment is not None:
        print(json.dumps(one_step(args)))
        return
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "experiment")}
    results: dict[str, Any] = {"setup": setup, "steps": []}
    for round_ in range(args.rounds):
        for name in args.experiments:
            cmd = [sys.executable, __file__, "--experiment", name, "--device", args.device]
            cmd += ["--precision", args.precision, "--sam", args.sam]
            cmd += [] if args.model is None else ["--model", args.model]
            cmd += [] if args.size is None else ["--size", str(args.size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed with exit code {proc.returncode}")
            step = {"experiment": name, "round": round_, **json.loads(proc.stdout.splitlines()[-1])}
            results["steps"].append(step)
            floor = step.get("floor", {}).get("floor")
            extra = "" if floor is None else f"   SSR floor {floor:7.1f} s"
            print(
                f"{name:14s} round {round_}: {step['seconds']:7.1f} s   step peak "
                f"{step['step_peak_bytes'] / 2**30:6.2f} GiB{extra}",
                flush=True,
            )
            results["summary"] = summarise(results["steps"])
            atomic_write_json(args.out, results)
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
