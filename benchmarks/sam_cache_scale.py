"""The SAM feature cache (`python -m ssr.uda.sam_cache`, an opt-in deviation) at paper scale: disk
per image, build time per SAM tile, and one training step with cached features against online
SAM, side by side.

A small GTA5 -> Cityscapes pair at the real frame sizes (the synthetic scenes of
`data_stream.py`), prepared for real; SAM ViT-B with random weights saved to a file in the
official layout (so that the builder and the trainer load the same encoder, as the cache's
fingerprint check demands); MiT-B5 with a random "ImageNet" file so that FD runs. The cache is
built with `ssr.uda.sam_cache.build_cache`, then the first training batch of the datamodule
(real crop records, which the cache needs) trains one step of `experiment=ssr` online and one
cached, alternating for `--rounds`. The whole-dataset figures (disk, SAM tiles) come from the
cache geometry (`ssr_cost_parts.cache.paper_scale_estimate`). Results:
benchmarks/results/sam_cache_scale.json.

    python benchmarks/sam_cache_scale.py [--frames 2] [--rounds 1] [--experiment ssr]
    smoke run (tiny model and SAM, never the committed file): --smoke --out /tmp/cache.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from data_stream import CS_SIZE, GTA_SIZE, write_pair
from hydra.utils import instantiate
from segment_anything import sam_model_registry
from ssr_cost_parts.cache import paper_scale_estimate
from ssr_cost_parts.common import StepTimer, compose_cfg, device_name
from torch.utils.data import DataLoader
from uda_memory import _imagenet_file, one_step_trainer

from ssr.data.prepare import main as prepare_main
from ssr.io import atomic_write_json
from ssr.train import build_module
from ssr.uda.sam_cache import build_cache

ROOT = Path(__file__).resolve().parents[1]


def _step_seconds(cfg: Any, batch: dict[str, Any]) -> float:
    torch.manual_seed(0)
    module = build_module(cfg)
    timer = StepTimer()
    one_step_trainer("cpu", callbacks=[timer]).fit(module, DataLoader([batch], batch_size=None))
    return timer.wall[0] / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2, help="frames per domain")
    parser.add_argument("--rounds", type=int, default=1, help="online/cached step pairs")
    parser.add_argument("--experiment", default="ssr")
    parser.add_argument("--smoke", action="store_true", help="tiny model and SAM: the path alone")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/sam_cache_scale.json"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pair(root, args.frames)
        for fmt, name in (("gta5", "gta"), ("cityscapes", "cityscapes")):
            if prepare_main([fmt, str(root / name), "--nproc", "1"]) != 0:
                return 1
        overrides = [
            f"experiment={args.experiment}",
            f"data.source_root={root / 'gta'}",
            f"data.target_root={root / 'cityscapes'}",
            "data.num_workers=0",
        ]
        if args.smoke:  # the tiny SAM's random weights are seeded: no file needed
            overrides += ["model=daformer_tiny", "uda/sam=tiny"]
        else:
            torch.manual_seed(0)
            sam_file = root / "sam_vit_b_random.pth"
            torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), sam_file)
            overrides.append(f"uda.sam.encoder.checkpoint={sam_file}")
        variant = "tiny" if args.smoke else "b5"
        overrides.append(f"model.backbone.pretrained={_imagenet_file(variant, root)}")
        cache = root / "cache"
        start = time.perf_counter()
        built = build_cache(compose_cfg("sam_cache", [*overrides, f"out={cache}", "device=cpu"]))
        build_seconds = time.perf_counter() - start
        online = compose_cfg("train", overrides)
        cached = compose_cfg("train", [*overrides, f"uda.sam.cache_dir={cache}"])
        datamodule = instantiate(online.data)
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        steps: dict[str, list[float]] = {"online": [], "cached": []}
        for round_ in range(args.rounds):
            for name, cfg in (("online", online), ("cached", cached)):
                steps[name].append(_step_seconds(cfg, batch))
                print(f"{name:7s} round {round_}: {steps[name][-1]:7.1f} s", flush=True)
    estimate = paper_scale_estimate()
    domains = {}
    for domain, key in (("source", "source (GTA5 -> 1280x704)"),
                        ("target", "target (Cityscapes train -> 1024x512)")):  # fmt: skip
        tiles = estimate[key]["sam_tiles_per_image"]
        seconds = built[domain]["seconds"] / built[domain]["images"]
        domains[domain] = {
            "images": built[domain]["images"],
            "MiB_per_image": built[domain]["bytes"] / built[domain]["images"] / 2**20,
            "MiB_per_image_geometry": estimate[key]["MiB_per_image_fp16"],
            "sam_tiles_per_image": tiles,
            "seconds_per_image": seconds,
            "seconds_per_tile": seconds / tiles,
        }
    median = {name: statistics.median(v) for name, v in steps.items()}
    result = {
        "experiment": args.experiment,
        "frame_sizes_hw": {"gta5": GTA_SIZE, "cityscapes": CS_SIZE},
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "build": domains,
        "build_seconds_total": build_seconds,
        "step_seconds": steps,
        "step_median_seconds": median,
        "cached_over_online": median["cached"] / median["online"],
        "full_cache": {
            "GiB_fp16": estimate["GiB_total_fp16"],
            "sam_tiles": estimate["sam_tiles_to_build"],
            "sam_crops_per_40k_run_online": estimate["sam_crops_per_40k_run_online"],
        },
    }
    atomic_write_json(args.out, result)
    print(
        f"cache: {domains['source']['MiB_per_image']:.2f} MiB per GTA5 frame, "
        f"{domains['source']['seconds_per_tile']:.1f} s per SAM tile; step online "
        f"{median['online']:.1f} s, cached {median['cached']:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
