"""The speed modes at paper scale, side by side with eager fp32: `torch.compile` of SAM's encoder
(`uda.sam.encoder.compile`) and of the student (`uda.compile`), and channels-last weights
(`uda.channels_last`).

SAM ViT-B: one forward of a training step's SAM input (2 source + 2 mixed crops at 1024², i.e.
`encode_pair`), eager and compiled alternating on one encoder (random ViT weights are not
seeded, so two encoders would differ); the compiled features' error against eager. Student
(MiT-B5 + DAFormer head): forward, cross-entropy and backward on 2 x 512² crops, eager,
compiled and channels-last, alternating on one network (the compiled one is `torch.compile` of
the same modules, as `uda.compile` does in place); the loss and gradient differences. The first
compiled call is timed apart (compilation). Results: benchmarks/results/speed_modes.json.

    python benchmarks/speed_modes.py [--parts sam student] [--reps 2] [--device cpu|cuda]
    smoke run (never the committed file): --variant tiny --model tiny --crop 64 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from sam_bf16 import crops
from ssr_cost_parts.common import compose_cfg, device_name, timed

from ssr.io import atomic_write_json
from ssr.uda.sam_encoder import SamEncoder

ROOT = Path(__file__).resolve().parents[1]


def _alternate(
    modes: dict[str, Callable[[], Any]], reps: int, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """First call of each mode (compilation included) timed apart, then `reps` rounds."""
    first, outputs, times = {}, {}, {name: [] for name in modes}
    for name, fn in modes.items():
        first[name], outputs[name] = timed(fn, device)
    for _ in range(reps):
        for name, fn in modes.items():
            seconds, outputs[name] = timed(fn, device)
            times[name].append(seconds)
    summary = {
        "first_call_seconds": first,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
    }
    return summary, outputs


def sam_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    encoder = SamEncoder(args.variant).to(device).eval()
    eager_encoder = encoder.encoder
    compiled_encoder = torch.compile(eager_encoder)
    x = crops(4, args.crop).to(device)

    def run(module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            encoder.encoder = module
            return torch.cat(encoder.encode_pair(x[:2], x[2:]))

        return call

    summary, feats = _alternate(
        {"eager": run(eager_encoder), "compiled": run(compiled_encoder)}, args.reps, device
    )
    ref, out = feats["eager"], feats["compiled"]
    summary["speedup"] = summary["median_seconds"]["eager"] / summary["median_seconds"]["compiled"]
    summary["relative_l2_error"] = float((out - ref).norm() / ref.norm())
    summary["input"] = [4, 3, encoder.input_size, encoder.input_size]
    return summary


def student_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    overrides = ["model.backbone.pretrained=null"]
    overrides += [f"model={'daformer_tiny' if args.model == 'tiny' else 'daformer'}"]
    torch.manual_seed(0)
    model = instantiate(compose_cfg("train", overrides).model).to(device).train()
    backbone, head = model.backbone, model.decode_head
    compiled = (torch.compile(backbone), torch.compile(head))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, args.crop, args.crop, generator=gen).to(device)
    y = torch.randint(0, 19, (2, args.crop // 4, args.crop // 4), generator=gen).to(device)

    layout = copy.deepcopy(model).to(memory_format=torch.channels_last)  # same weights

    def step(net: torch.nn.Module, parts: tuple[torch.nn.Module, ...]) -> Callable[[], Any]:
        def call() -> tuple[float, list[torch.Tensor]]:
            net.zero_grad(set_to_none=True)
            torch.manual_seed(0)  # drop-path draws
            loss = F.cross_entropy(parts[1](parts[0](x)), y)
            loss.backward()
            return loss.item(), [p.grad.clone() for p in net.parameters()]

        return call

    modes = {
        "eager": step(model, (backbone, head)),
        "compiled": step(model, compiled),
        "channels_last": step(layout, (layout.backbone, layout.decode_head)),
    }
    summary, outputs = _alternate(modes, args.reps, device)
    ref_loss, ref_grads = outputs["eager"]
    for name in ("compiled", "channels_last"):
        loss, grads = outputs[name]
        summary[f"{name}_speedup"] = (
            summary["median_seconds"]["eager"] / summary["median_seconds"][name]
        )
        summary[f"{name}_loss_rel_diff"] = abs(loss - ref_loss) / abs(ref_loss)
        summary[f"{name}_grad_max_rel_diff"] = max(
            float((g - r).norm() / r.norm().clamp(min=1e-12))
            for g, r in zip(grads, ref_grads, strict=True)
        )
    summary["input"] = [2, 3, args.crop, args.crop]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", choices=["sam", "student"], default=["sam", "student"]
    )
    parser.add_argument("--variant", default="vit_b", help="SAM variant (tiny: smoke runs)")
    parser.add_argument("--model", default="b5", choices=["b5", "tiny"])
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2, help="timed calls per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/speed_modes.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result: dict[str, Any] = {"device": device_name(device), "torch": torch.__version__}
    for part in args.parts:
        result[part] = (sam_part if part == "sam" else student_part)(args, device)
        atomic_write_json(args.out, result)
        print(part, result[part], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
