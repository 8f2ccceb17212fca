"""Peak-memory measurement shared by the benchmarks: CUDA allocator stats or the CPU profiler."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device, fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes allocated while `fn` runs above the level before it, fn's result).

    CUDA: `max_memory_allocated`. CPU: the running total of the profiler's allocation trace, which
    records every CPU tensor allocation and free (tracemalloc does not see torch's allocator).
    """
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        sync(device)
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
