"""What SSR costs, measured side by side in one run; results in one JSON file.

Parts (each a function `part(args) -> dict` in `benchmarks/ssr_cost_parts/`, stored under its key
of the JSON file):
  fusion      (b) SSR's cross-attention fusion at the real stage sizes of a 512x512 crop (MiT-B5
              stage tokens 128^2, 64^2, 32^2, 16^2 query 64^2 projected SAM tokens;
              docs/method.md §6.5, §6.10.6): fused `scaled_dot_product_attention` vs the
              reference's explicit softmax(QK^T * scale)V, forward + backward, peak memory and
              wall time (`fusion.py`).
  inference   (a) latency of the exported SSR student vs the exported DAFormer student: both
              trained one step from their experiments (`demo_ssr` / `demo_daformer`, or MiT-B5
              built randomly with --infer-model b5), exported with `ssr.export`, loaded with
              `ssr.model.checkpoint.load_segmentor`, whole-image inference
              (`ssr.model.inference.Inference`) at the Cityscapes test scale, timed interleaved
              (alternating order), median of --infer-reps. Expected ratio 1.00: the shipped
              network is the same (§6.1), which the part also checks key by key (`inference.py`).
  train_step  (c) one training step of `ssr`/`daformer` and `mic_ssr`/`mic` (tiny model, tiny
              SAM, the demo experiments on a synthetic dataset built in a temporary folder),
              SAM online vs SAM from the cache of `ssr.uda.sam_cache`; variants timed
              round-robin. Also: SAM's share of the step (online encode vs cache read + mix)
              (`train_step.py`) and (d) what the cache changes (cached vs online features:
              relative error and cosine similarity), the cache's build time, and its disk
              size/SAM calls at paper scale (vit_b, GTA5 and Cityscapes), computed from the cache
              geometry (`cache.py`).

Run: python benchmarks/ssr_cost.py --device cpu [--parts fusion inference train_step] [--threads 1]
     (--threads 1 on a shared CPU: with 2 threads under load, every intra-op barrier waits for a
     descheduled thread and latencies swing 5-10x)
     python benchmarks/ssr_cost.py --markdown   (print the README tables of the JSON file only)
     Smoke run (seconds to minutes, never the committed file): --out /tmp/ssr_cost.json
     --stages 3 --reps 1 --warmup 0 --infer-reps 4 --infer-warmup 1 --rounds 1 --steps 2
     --fidelity-samples 4
An existing output file is updated: only the parts run now are replaced, per device
(JSON: {part: {device: result}}). A Markdown summary for the README is printed at the end.

Memory, CUDA: torch.cuda.max_memory_allocated above what was allocated before the forward.
Memory, CPU: the same quantity from the profiler's allocation trace (every CPU allocation and
free with the running total), since torch keeps no CPU allocator statistics. `saved_bytes` is the
size of the tensors autograd keeps for backward (unique storages, inputs and weights excluded).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ssr_cost_parts.fusion import fusion_part
from ssr_cost_parts.inference import inference_part
from ssr_cost_parts.markdown import markdown
from ssr_cost_parts.train_step import train_step_part

from ssr.model.mit import MIT_VARIANTS
from ssr.uda.sam_encoder import SAM_VARIANTS

PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fusion": fusion_part,
    "inference": inference_part,
    "train_step": train_step_part,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ssr_cost.json"))
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], choices=range(4))
    p.add_argument("--batch", type=int, default=2, help="images per branch pass (SSR: 2)")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--mit", default="b5", choices=sorted(MIT_VARIANTS))
    p.add_argument("--sam", default="vit_b", choices=sorted(SAM_VARIANTS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None, help="timed runs (default: cpu 2, cuda 10)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--infer-model", default="tiny", choices=["tiny", *sorted(MIT_VARIANTS)])
    p.add_argument("--infer-size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    p.add_argument("--infer-reps", type=int, default=150)
    p.add_argument("--infer-warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="(c) round-robin rounds")
    p.add_argument("--steps", type=int, default=5, help="(c) training steps per fit")
    p.add_argument("--step-batch", type=int, default=2, help="(c) batch (SSR configs: 2)")
    p.add_argument("--step-warmup", type=int, default=1, help="(c) untimed steps per fit")
    p.add_argument("--fidelity-samples", type=int, default=24, help="(c) training samples")
    p.add_argument("--markdown", action="store_true", help="only print the README tables")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is far steadier on a shared machine",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if "train_step" in args.parts and args.steps <= args.step_warmup:
        p.error(f"--steps {args.steps} leaves no timed step after --step-warmup {args.step_warmup}")
    args.reps = args.reps if args.reps is not None else (2 if args.device == "cpu" else 10)
    args.stages = sorted(set(args.stages))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.parts:
        results.setdefault(name, {})[args.device] = PARTS[name](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
