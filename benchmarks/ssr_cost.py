"""What SSR costs (issue 4 evidence), measured side by side in one run; results in one JSON file.

Parts (each a function `part(args) -> dict`, stored under its key of the JSON file):
  fusion      (b) SSR's cross-attention fusion at the real stage sizes of a 512x512 crop (MiT-B5
              stage tokens 128^2, 64^2, 32^2, 16^2 query 64^2 projected SAM tokens; ALGORITHM.md
              §6.5, §6.10.6): fused `scaled_dot_product_attention` vs the reference's explicit
              softmax(QK^T * scale)V, forward + backward, peak memory and wall time.
  inference   (a) exported SSR model vs baseline latency   -- not written yet
  train_step  (c) one training step, tiny model / tiny SAM  -- not written yet

Run: python benchmarks/ssr_cost.py --device cpu [--stages 0 1 2 3] [--batch 2] [--reps 2]
An existing output file is updated: only the parts run now are replaced, per device
(JSON: {part: {device: result}}).

Memory, CUDA: torch.cuda.max_memory_allocated above what was allocated before the forward.
Memory, CPU: the same quantity from the profiler's allocation trace (every CPU allocation and
free with the running total), since torch keeps no CPU allocator statistics. `saved_bytes` is the
size of the tensors autograd keeps for backward (unique storages, inputs and weights excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry

from ssr.model.mit import MIT_VARIANTS
from ssr.uda.sam import ATTENTION_MODES, CrossAttentionFusion

MIT_STRIDES = (4, 8, 16, 32)  # stage output strides of MiT (§1.2)


def sam_grid(variant: str = "vit_b") -> int:
    """Side of SAM's token grid (64 for every released SAM), read from the model, not restated."""
    with torch.device("meta"):
        return sam_model_registry[variant](checkpoint=None).image_encoder.pos_embed.shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device, fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes allocated while `fn` runs above the level before it, fn's result)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = [
        e["args"] for e in events if e.get("name") == "[memory]" and e["args"]["Device Type"] == 0
    ]
    if not mem:
        return 0, result
    # The running total persists across profiler sessions: start from the level before event 0.
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(m["Total Allocated"] for m in mem) - base, result


class FusionCase:
    """One stage's fusion layer with inputs that require grad, as in training."""

    def __init__(self, side: int, dim: int, heads: int, keys: int, batch: int, device, dtype):
        gen = torch.Generator().manual_seed(side)
        self.layer = CrossAttentionFusion(dim, heads).to(device, dtype)
        self.x = torch.randn(batch, side * side, dim, generator=gen).to(device, dtype)  # queries
        self.ctx = torch.randn(batch, keys, dim, generator=gen).to(device, dtype)  # SAM tokens
        self.grad = torch.randn(batch, side * side, dim, generator=gen).to(device, dtype)
        self.x.requires_grad_()  # backbone features
        self.ctx.requires_grad_()  # output of the trained projection
        self.inputs = [self.x, self.ctx, *self.layer.parameters()]

    def forward(self, attention: str) -> torch.Tensor:
        self.layer.attention = attention
        return self.layer(self.x, self.ctx)

    def zero_grad(self) -> None:
        for t in self.inputs:
            t.grad = None


def _run(cases: Sequence[FusionCase], attention: str) -> None:
    """Forward of every case into one graph, then one backward (how a training step uses them)."""
    outs = [c.forward(attention) for c in cases]
    torch.autograd.backward(outs, [c.grad for c in cases])


def _run_counting_saved(cases: Sequence[FusionCase], attention: str) -> int:
    """`_run`, returning the bytes autograd saved for backward (once per storage, no inputs)."""
    skip = {t.untyped_storage().data_ptr() for c in cases for t in c.inputs}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(cases, attention)
    return sum(storages.values())


def _measure(cases: Sequence[FusionCase], device, reps: int, warmup: int) -> dict[str, dict]:
    """Both attention modes, timed runs interleaved so that load changes hit both alike.

    `cpu_time_ms` (process CPU time, all threads) is less sensitive than wall time to other
    processes sharing the CPU.
    """
    wall: dict[str, list[float]] = {m: [] for m in ATTENTION_MODES}
    cpu: dict[str, list[float]] = {m: [] for m in ATTENTION_MODES}
    for i in range(warmup + reps):
        for mode in ATTENTION_MODES:
            for c in cases:
                c.zero_grad()
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _run(cases, mode)
            _sync(device)
            if i >= warmup:
                wall[mode].append(1e3 * (time.perf_counter() - start))
                cpu[mode].append(1e3 * (time.process_time() - start_cpu))
    out = {}
    for mode in ATTENTION_MODES:
        for c in cases:
            c.zero_grad()
        peak, saved = _peak_bytes(device, lambda mode=mode: _run_counting_saved(cases, mode))
        for c in cases:
            c.zero_grad()
        out[mode] = {
            "time_ms": statistics.median(wall[mode]) if wall[mode] else None,
            "cpu_time_ms": statistics.median(cpu[mode]) if cpu[mode] else None,
            "times_ms": [round(t, 2) for t in wall[mode]],
            "peak_bytes": peak,
            "saved_bytes": saved,
        }
    return out


def _ratios(res: dict[str, dict]) -> dict[str, float | None]:
    """explicit / sdpa: > 1 means the fused kernel is better."""
    sdpa, ref = res["sdpa"], res["explicit"]

    def ratio(key: str) -> float | None:
        return round(ref[key] / sdpa[key], 3) if ref[key] and sdpa[key] else None

    return {
        "memory_ratio": ratio("peak_bytes"),
        "saved_ratio": ratio("saved_bytes"),
        "time_ratio": ratio("time_ms"),
        "cpu_time_ratio": ratio("cpu_time_ms"),
    }


def fusion_part(args: argparse.Namespace) -> dict[str, Any]:
    """(b): each stage alone (time, memory), then all selected stages in one graph (memory)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = MIT_VARIANTS[args.mit]
    keys = sam_grid(args.sam) ** 2
    cases = {}
    for i in args.stages:
        side, dim, heads = args.crop // MIT_STRIDES[i], spec.embed_dims[i], spec.num_heads[i]
        cases[i] = FusionCase(side, dim, heads, keys, args.batch, device, dtype)
    stages = []
    for i, case in cases.items():
        with torch.no_grad():
            diff = (case.forward("sdpa") - case.forward("explicit")).abs().max().item()
        row: dict[str, Any] = {
            "stage": i,
            "queries": case.x.shape[1],
            "keys": keys,
            "channels": case.x.shape[2],
            "heads": case.layer.num_heads,
            "max_abs_diff": diff,
        }
        row |= _measure([case], device, args.reps, args.warmup)
        for mode in ATTENTION_MODES:
            print(f"stage {i} {mode:8s} {_fmt(row[mode])}", flush=True)
        row |= _ratios(row)
        stages.append(row)
    # All stages in one graph: their saved tensors coexist until the backward (memory only).
    together: dict[str, Any] = {"stages": list(cases)}
    together |= _measure(list(cases.values()), device, reps=0, warmup=0)
    for mode in ATTENTION_MODES:
        print(f"stages {list(cases)} {mode:8s} {_fmt(together[mode])}", flush=True)
    together |= _ratios(together)
    return {
        "what": "CrossAttentionFusion forward+backward, sdpa vs explicit softmax (ALGORITHM §6.5)",
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch,
        "crop": args.crop,
        "mit": args.mit,
        "sam": args.sam,
        "reps": args.reps,
        "warmup": args.warmup,
        "memory": "peak bytes allocated above the pre-forward level (CUDA allocator, CPU profiler)",
        "ratios": "explicit / sdpa",
        "per_stage": stages,
        "all_stages": together,
    }


def _fmt(r: dict[str, Any]) -> str:
    t = f"{r['time_ms']:8.0f} ms (cpu {r['cpu_time_ms']:8.0f})" if r["time_ms"] is not None else ""
    t = f"{t:27s}"
    return (
        f"{t}  peak {r['peak_bytes'] / 2**20:8.1f} MiB  saved {r['saved_bytes'] / 2**20:8.1f} MiB"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"fusion": fusion_part}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ssr_cost.json"))
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], choices=range(4))
    p.add_argument("--batch", type=int, default=2, help="images per branch pass (SSR: 2)")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--mit", default="b5", choices=sorted(MIT_VARIANTS))
    p.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None, help="timed runs (default: cpu 2, cuda 10)")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    args.reps = args.reps if args.reps is not None else (2 if args.device == "cpu" else 10)
    args.stages = sorted(set(args.stages))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.parts:
        results.setdefault(name, {})[args.device] = PARTS[name](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
