"""(a) Latency of the exported SSR student vs the exported DAFormer student.

Both are trained one step from their experiments (`demo_ssr` / `demo_daformer`, or MiT-B5 built
randomly with --infer-model b5), exported with `ssr.export`, loaded with
`ssr.model.checkpoint.load_segmentor` and run by the test protocol
(`ssr.model.inference.Inference`, whole image) at the Cityscapes test scale, timed interleaved
(alternating order), median of --infer-reps. Expected ratio 1.00: the shipped network is the same
(docs/method.md §6.1), which the part also checks key by key.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peak_memory import sync
from torch.utils.flop_counter import FlopCounterMode

from ssr.export import export
from ssr.model.checkpoint import load_segmentor
from ssr.model.inference import Inference

from .common import compose_cfg, device_name, fit, median, random_batches, seeded_module

EXPERIMENTS = {"daformer": "demo_daformer", "ssr": "demo_ssr"}


def inference_part(args: argparse.Namespace) -> dict[str, Any]:
    """(a): exported SSR student vs exported DAFormer student, same input, interleaved timing."""
    device = torch.device(args.device)
    model = [] if args.infer_model == "tiny" else [f"model=daformer_mit{args.infer_model}"]
    model += ["model.backbone.pretrained=null"] if model else []
    segmentors, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, experiment in EXPERIMENTS.items():
            cfg = compose_cfg("train", [f"experiment={experiment}", *model])
            trainer = fit(seeded_module(cfg), random_batches(1))
            ckpt, out = Path(tmp) / f"{name}.ckpt", Path(tmp) / f"{name}.pt"
            trainer.save_checkpoint(ckpt)
            stats = export(ckpt, out, cfg.model)
            segmentors[name], _, fmt = load_segmentor(out, cfg.model, device)
            assert fmt == "export", fmt
            files[name] = {"params": stats["params"], "bytes": stats["bytes"]}
    shapes = {
        n: {k: tuple(v.shape) for k, v in s.state_dict().items()} for n, s in segmentors.items()
    }
    same = list(shapes["ssr"].items()) == list(shapes["daformer"].items())
    height, width = args.infer_size
    out_size = (2 * height, 2 * width)
    # The input is already at the test scale: the protocol's resize is the data pipeline's job.
    protocol = Inference(mode="whole", resize=None)
    img = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    flops = {}
    for name, segmentor in segmentors.items():  # the deterministic half of the evidence
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            protocol.logits(segmentor, img, out_size)
        flops[name] = counter.get_total_flops()
    wall: dict[str, list[float]] = {n: [] for n in segmentors}
    cpu: dict[str, list[float]] = {n: [] for n in segmentors}
    names = list(segmentors)
    with torch.inference_mode():
        for i in range(args.infer_warmup + args.infer_reps):
            for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                protocol.logits(segmentors[name], img, out_size)
                sync(device)
                if i >= args.infer_warmup:
                    wall[name].append(1e3 * (time.perf_counter() - start))
                    cpu[name].append(1e3 * (time.process_time() - start_cpu))
    result: dict[str, Any] = {
        "what": "exported student inference latency, SSR / DAFormer (whole image, §3.2)",
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.infer_model,
        "input": [height, width],
        "output": list(out_size),
        "reps": args.infer_reps,
        "warmup": args.infer_warmup,
        "identical_keys_and_shapes": same,
        "files": files,
        "gflops": {n: round(f / 1e9, 3) for n, f in flops.items()},
        "time_ratio_is": "median over rounds of ssr/daformer, each round timing both back to back",
    }
    for name in names:
        result[name] = {
            "time_ms": median(wall[name]),
            "cpu_time_ms": median(cpu[name]),
            "times_ms": [round(t, 2) for t in wall[name]],
        }
        print(f"inference {name:8s} {result[name]['time_ms']:8.1f} ms", flush=True)
    # Paired per-round ratios: both networks timed back to back under the same load; their
    # median is robust to the load changes of a shared machine, unlike a ratio of medians.
    paired = [a / b for a, b in zip(wall["ssr"], wall["daformer"], strict=True)]
    paired_cpu = [a / b for a, b in zip(cpu["ssr"], cpu["daformer"], strict=True)]
    result["time_ratio"] = median(paired)
    result["time_ratio_iqr"] = [round(float(q), 3) for q in np.percentile(paired, [25, 75])]
    result["cpu_time_ratio"] = median(paired_cpu)
    result["ratio_of_medians"] = round(result["ssr"]["time_ms"] / result["daformer"]["time_ms"], 3)
    result["ratio_of_minima"] = round(min(wall["ssr"]) / min(wall["daformer"]), 3)
    return result
