"""Host-to-device copies of the training step's small CPU tensors (random draws, class lists,
constants) without a host sync.

A plain `.to("cuda")` of a pageable CPU tensor waits until the GPU has drained its queue, so the
CPU stops queuing kernels; a paper-scale step on a fast GPU then spends much of its time idle
(benchmarks/gpu_check.py counts these syncs). Going through pinned memory makes the copy
asynchronous; the values are the same bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """`t.to(device, dtype)`, asynchronous for CPU -> CUDA (pinned staging copy)."""
    device = torch.device(device)
    if dtype is not None:
        t = t.to(dtype)  # on the CPU first: the same rounding as on the device
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
