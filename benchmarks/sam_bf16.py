"""SAM's bf16 speed mode at paper size: feature error and time against fp32, side by side.

`uda.sam.encoder.bf16=true` (a deviation, off by default) runs the frozen SAM image encoder under
bfloat16 autocast while the student trains in fp32. This times one SAM forward on a training
step's input (the 2 source + 2 mixed crops, resized to 1024², i.e. `encode_pair`) in fp32 and in
bf16, alternating, on synthetic street scenes, and measures the bf16 features' error: relative
L2, max |Δ|, and the mean cosine similarity of the token vectors. Random SAM weights by default
(no file can be downloaded here); `--checkpoint sam_vit_b_01ec64.pth` for the real encoder.

    python benchmarks/sam_bf16.py [--variant vit_b] [--reps 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ssr_cost_parts.common import timed

from ssr.data.labels import MEAN, STD
from ssr.data.synthetic.style import make_sample
from ssr.io import atomic_write_json
from ssr.uda.sam_encoder import SamEncoder

ROOT = Path(__file__).resolve().parents[1]


def crops(n: int, size: int) -> torch.Tensor:
    """`n` normalised synthetic scenes at the training crop size (a step's SAM input)."""
    images = [make_sample("target" if i % 2 else "source", "train", i)[0] for i in range(n)]
    batch = torch.cat(
        [
            F.interpolate(
                torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                size=(size, size),
                mode="bilinear",
                align_corners=False,
            )
            for image in images
        ]
    )
    return (batch - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--checkpoint", help="a SAM file (default: random weights)")
    parser.add_argument("--crop", type=int, default=512, help="training crop side")
    parser.add_argument("--reps", type=int, default=2, help="timed forwards per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sam_bf16.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # One encoder, the mode switched between calls: random ViT weights are not seeded.
    encoder = SamEncoder(args.variant, args.checkpoint).to(device).eval()
    x = crops(4, args.crop).to(device)
    src, mix = x[:2], x[2:]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    feats: dict[str, torch.Tensor] = {}
    for _ in range(args.reps):
        for mode in times:
            encoder.bf16 = mode == "bf16"
            seconds, feats[mode] = timed(lambda: torch.cat(encoder.encode_pair(src, mix)), device)
            times[mode].append(seconds)
    ref, out = feats["fp32"].float(), feats["bf16"].float()
    tokens_ref, tokens_out = ref.flatten(2), out.flatten(2)
    result = {
        "variant": args.variant,
        "weights": args.checkpoint or "random (seed 0)",
        "device": str(device),
        "input": [4, 3, encoder.input_size, encoder.input_size],
        "median_seconds": {mode: statistics.median(t) for mode, t in times.items()},
        "speedup": statistics.median(times["fp32"]) / statistics.median(times["bf16"]),
        "relative_l2_error": float((out - ref).norm() / ref.norm()),
        "max_abs_error": float((out - ref).abs().max()),
        "mean_token_cosine": float(F.cosine_similarity(tokens_out, tokens_ref, dim=1).mean()),
        "features_dtype": str(feats["bf16"].dtype),
    }
    atomic_write_json(args.out, result)
    seconds = result["median_seconds"]
    print(
        f"SAM {args.variant} on {result['input']}: fp32 {seconds['fp32']:.1f} s, "
        f"bf16 {seconds['bf16']:.1f} s ({result['speedup']:.2f}x); feature error "
        f"{result['relative_l2_error']:.2e} relative L2, cosine {result['mean_token_cosine']:.5f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
