"""(b) SSR's cross-attention fusion: fused SDPA vs the reference's explicit softmax attention.

At the real stage sizes of a 512x512 crop (MiT-B5 stage tokens 128^2, 64^2, 32^2, 16^2 query
64^2 projected SAM tokens; docs/method.md §6.5, §6.10.6), forward + backward, peak memory and
wall time. `saved_bytes` is the size of the tensors autograd keeps for backward (unique storages,
inputs and weights excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from peak_memory import peak_bytes, sync
from segment_anything import sam_model_registry

from ssr.model.mit import MIT_VARIANTS
from ssr.uda.ssr import ATTENTION_MODES, CrossAttentionFusion

from .common import device_name

MIT_STRIDES = (4, 8, 16, 32)  # stage output strides of MiT (docs/method.md §1.2)


def sam_grid(variant: str = "vit_b") -> int:
    """Side of SAM's token grid (64 for every released SAM), read from the model, not restated."""
    with torch.device("meta"):
        return sam_model_registry[variant](checkpoint=None).image_encoder.pos_embed.shape[1]


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
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _run(cases, mode)
            sync(device)
            if i >= warmup:
                wall[mode].append(1e3 * (time.perf_counter() - start))
                cpu[mode].append(1e3 * (time.process_time() - start_cpu))
    out = {}
    for mode in ATTENTION_MODES:
        for c in cases:
            c.zero_grad()
        peak, saved = peak_bytes(device, lambda mode=mode: _run_counting_saved(cases, mode))
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


def _fmt(r: dict[str, Any]) -> str:
    t = f"{r['time_ms']:8.0f} ms (cpu {r['cpu_time_ms']:8.0f})" if r["time_ms"] is not None else ""
    t = f"{t:27s}"
    return (
        f"{t}  peak {r['peak_bytes'] / 2**20:8.1f} MiB  saved {r['saved_bytes'] / 2**20:8.1f} MiB"
    )


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
        "what": "CrossAttentionFusion forward+backward, sdpa vs explicit softmax "
        "(docs/method.md §6.5)",
        "device": device_name(device),
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
