"""ONNX Runtime vs PyTorch latency of the exported student at the 1024x512 test scale, on the CPU.

Builds the paper's shipped network (DAFormer, MiT-B5; random weights, no file needed) or another
`--model`, exports it with `ssr.model.onnx.export_onnx` (which checks ONNX Runtime against PyTorch
on the same input first), then times one forward of each, interleaved round by round with the same
thread count, and reports medians, their ratio, and the export check.

Run: python benchmarks/onnx_latency.py [--model daformer_mitb5] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from ssr import CONF_MODULE
from ssr.io import atomic_write_json
from ssr.model.onnx import INPUT, OUTPUT, export_onnx

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="daformer_mitb5", help="a model= config")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], help="(height, width)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_latency.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        cfg = compose("eval", [f"model={args.model}", "model.backbone.pretrained=null"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    x = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        check = export_onnx(model, path, {"benchmark": True}, check_size=args.size)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_torch() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(x)
        return time.perf_counter() - start

    def run_onnx() -> float:
        start = time.perf_counter()
        session.run([OUTPUT], {INPUT: x.numpy()})
        return time.perf_counter() - start

    run_torch(), run_onnx()  # warm-up: allocators, kernel selection
    times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(args.reps):
        times["pytorch"].append(run_torch())
        times["onnxruntime"].append(run_onnx())
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "input_hw": args.size,
        "threads": args.threads,
        "reps": args.reps,
        "params": sum(p.numel() for p in model.parameters()),
        "median_ms": {k: round(1000 * v, 1) for k, v in median.items()},
        "times_ms": {k: [round(1000 * t, 1) for t in v] for k, v in times.items()},
        "onnxruntime_over_pytorch": round(median["onnxruntime"] / median["pytorch"], 3),
        "export_s": round(export_s, 1),
        "export_check": check,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("model", "median_ms", "onnxruntime_over_pytorch")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
